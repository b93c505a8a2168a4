//! The chaos run's private services: a PostgreSQL cluster, a RabbitMQ node and a Garage
//! store of its own, on free ports under one state directory, so that it can stop and
//! restart each of them without disturbing anything else on the machine.

use std::fs;
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// How long a service may take to come up before the run gives up.
const START_DEADLINE: Duration = Duration::from_secs(120);

/// The access key the private Garage serves; it guards a store bound to 127.0.0.1
/// that lives only as long as the run.
pub const ACCESS_KEY_ID: &str = "GK0c4a05f3d3b1e8e2a6b7c9d1";
pub const SECRET_ACCESS_KEY: &str =
    "5b0f6c7e2d9a4b1c8e3f7a6d5c4b3a2918f7e6d5c4b3a29180f1e2d3c4b5a697";
pub const S3_REGION: &str = "garage";
pub const S3_BUCKET: &str = "dsa-chaos";
/// The database of the run, made by the caller (with `support::recreate_database`).
pub const DATABASE: &str = "dsa_chaos";

/// A port nobody listens on right now.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// `bytes` random bytes from the kernel, in hex: secrets that live as long as the run.
fn random_hex(bytes: usize) -> anyhow::Result<String> {
    let mut buffer = vec![0u8; bytes];
    std::io::Read::read_exact(&mut fs::File::open("/dev/urandom")?, &mut buffer)?;
    Ok(hex::encode(buffer))
}

fn port_open(port: u16) -> bool {
    TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200)).is_ok()
}

/// Runs `command` to completion; an error names it and shows what it printed.
fn run(command: &mut Command) -> anyhow::Result<Output> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not start {command:?}"))?;
    if !output.status.success() {
        bail!(
            "{command:?} failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout).trim(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(output)
}

/// Calls `ready` every quarter second until it holds or `deadline` passes.
fn await_condition(
    what: &str,
    deadline: Duration,
    mut ready: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let started = Instant::now();
    while !ready() {
        if started.elapsed() > deadline {
            bail!("{what} did not happen within {deadline:?}");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    Ok(())
}

/// The three private services.
pub struct Services {
    pub postgres: Postgres,
    pub rabbitmq: RabbitMq,
    pub garage: Garage,
}

impl Services {
    /// Sets up and starts all three under `state_dir`.
    pub fn start(state_dir: &Path, garage_binary: PathBuf) -> anyhow::Result<Self> {
        let postgres = Postgres::create(&state_dir.join("postgres"))?;
        let rabbitmq = RabbitMq::create(&state_dir.join("rabbitmq"))?;
        let garage = Garage::create(&state_dir.join("garage"), garage_binary)?;
        let mut services = Self {
            postgres,
            rabbitmq,
            garage,
        };
        services.postgres.start()?;
        services.rabbitmq.start()?;
        services.garage.start()?;
        services.garage.set_up_store()?;
        Ok(services)
    }

    /// The settings that point a `dsa-ingest` process at these services.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("DATABASE_URL", self.postgres.database_url()),
            ("AMQP_URL", self.rabbitmq.amqp_url()),
            ("S3_ENDPOINT", self.garage.endpoint()),
            ("S3_REGION", S3_REGION.to_owned()),
            ("S3_BUCKET", S3_BUCKET.to_owned()),
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID.to_owned()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY.to_owned()),
        ]
    }
}

// ---------------------------------------------------------------------------- PostgreSQL

/// A private PostgreSQL cluster made with the machine's own binaries.
pub struct Postgres {
    bin_dir: PathBuf,
    data_dir: PathBuf,
    log: PathBuf,
    pub port: u16,
}

impl Postgres {
    /// `initdb` into `dir/data`, as the `postgres` user when this runs as root (the
    /// server refuses to run as root).
    fn create(dir: &Path) -> anyhow::Result<Self> {
        fs::create_dir_all(dir)?;
        let postgres = Self {
            bin_dir: postgres_bin_dir()?,
            data_dir: dir.join("data"),
            log: dir.join("postgres.log"),
            port: free_port()?,
        };
        if running_as_root() {
            run(Command::new("chown").arg("postgres:").arg(dir))?;
        }
        run(postgres
            .as_owner("initdb")
            .args([
                "--auth=trust",
                "--username=postgres",
                "--encoding=UTF8",
                "--no-sync",
                "-D",
            ])
            .arg(&postgres.data_dir))?;
        Ok(postgres)
    }

    fn as_owner(&self, program: &str) -> Command {
        let program = self.bin_dir.join(program);
        if running_as_root() {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(program);
            command
        } else {
            Command::new(program)
        }
    }

    pub fn database_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{DATABASE}", self.port)
    }

    /// Starts the server and waits until it accepts connections. `fsync` is off: a
    /// restart here stops the server, never the machine, so the page cache survives.
    pub fn start(&self) -> anyhow::Result<()> {
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' -c fsync=off \
             -c max_connections=200",
            self.port
        );
        run(self
            .as_owner("pg_ctl")
            .arg("-D")
            .arg(&self.data_dir)
            .arg("-l")
            .arg(&self.log)
            .args(["-w", "-t", "120", "-o", &options, "start"]))
        .context("starting the private PostgreSQL")?;
        Ok(())
    }

    /// Stops the server as a crash would (`-m immediate`: no shutdown checkpoint,
    /// connections cut), so that the next start runs crash recovery.
    pub fn crash(&self) -> anyhow::Result<()> {
        self.stop("immediate")
    }

    fn stop(&self, mode: &str) -> anyhow::Result<()> {
        run(self
            .as_owner("pg_ctl")
            .arg("-D")
            .arg(&self.data_dir)
            .args(["-m", mode, "-w", "stop"]))
        .with_context(|| format!("stopping the private PostgreSQL (-m {mode})"))?;
        Ok(())
    }

    fn is_running(&self) -> bool {
        self.data_dir.join("postmaster.pid").exists()
    }
}

fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The newest `/usr/lib/postgresql/<version>/bin`, else the directory of `pg_ctl` on
/// the PATH.
fn postgres_bin_dir() -> anyhow::Result<PathBuf> {
    let newest = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version: u32 = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .max();
    if let Some((_, bin)) = newest {
        return Ok(bin);
    }
    let found = run(Command::new("sh").args(["-c", "command -v pg_ctl"])).context(
        "no PostgreSQL server binaries: neither /usr/lib/postgresql/*/bin nor pg_ctl on the PATH",
    )?;
    let pg_ctl = PathBuf::from(String::from_utf8_lossy(&found.stdout).trim());
    Ok(pg_ctl
        .parent()
        .context("pg_ctl has a directory")?
        .to_owned())
}

// ------------------------------------------------------------------------------ RabbitMQ

/// A private RabbitMQ node: its own node name, ports, Erlang cookie, data and logs.
pub struct RabbitMq {
    dir: PathBuf,
    pub node: String,
    pub port: u16,
    dist_port: u16,
}

impl RabbitMq {
    fn create(dir: &Path) -> anyhow::Result<Self> {
        let port = free_port()?;
        let rabbitmq = Self {
            dir: dir.to_owned(),
            node: format!("dsa-chaos-{port}@localhost"),
            port,
            dist_port: free_port()?,
        };
        for sub in ["home", "mnesia", "log"] {
            fs::create_dir_all(dir.join(sub))?;
        }
        fs::write(dir.join("node"), &rabbitmq.node)?;
        // No plugins (the machine's list may enable the management UI on a fixed
        // port), a listener on our port only, and no machine-wide environment file,
        // which may name another node.
        fs::write(dir.join("enabled_plugins"), "[].\n")?;
        fs::write(
            dir.join("rabbitmq.conf"),
            format!("listeners.tcp.local = 127.0.0.1:{port}\nloopback_users = none\n"),
        )?;
        fs::write(dir.join("rabbitmq-env.conf"), "")?;
        let cookie = dir.join("home/.erlang.cookie");
        fs::File::create(&cookie)?.write_all(random_hex(20)?.as_bytes())?;
        fs::set_permissions(&cookie, std::os::unix::fs::PermissionsExt::from_mode(0o400))?;
        Ok(rabbitmq)
    }

    /// A RabbitMQ script with the node's environment. The package's scripts in
    /// /usr/lib/rabbitmq/bin run as the calling user; the /usr/sbin wrappers would
    /// switch to the machine's `rabbitmq` user and its cookie.
    fn command(&self, script: &str) -> Command {
        let packaged = Path::new("/usr/lib/rabbitmq/bin").join(script);
        let mut command = Command::new(if packaged.exists() {
            packaged
        } else {
            PathBuf::from(script)
        });
        let dir = &self.dir;
        command
            .env("HOME", dir.join("home"))
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
            .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq.conf"))
            .env("RABBITMQ_CONF_ENV_FILE", dir.join("rabbitmq-env.conf"))
            .env("RABBITMQ_PID_FILE", dir.join("rabbitmq.pid"))
            .env("ERL_EPMD_ADDRESS", "127.0.0.1");
        command
    }

    /// `rabbitmqctl -n NODE ARGS...`
    pub fn ctl(&self, args: &[&str]) -> anyhow::Result<String> {
        let output = run(self
            .command("rabbitmqctl")
            .args(["-q", "-n", &self.node])
            .args(args))?;
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// Starts the node and waits until it has booted and listens for AMQP.
    pub fn start(&self) -> anyhow::Result<()> {
        run(self.command("rabbitmq-server").arg("-detached"))
            .context("starting the private RabbitMQ node")?;
        await_condition(
            "the private RabbitMQ node's startup",
            START_DEADLINE,
            || self.ctl(&["await_startup"]).is_ok(),
        )?;
        await_condition("RabbitMQ listening for AMQP", START_DEADLINE, || {
            port_open(self.port)
        })
    }

    /// Stops the node and its Erlang VM; returns once it is down.
    pub fn stop(&self) -> anyhow::Result<()> {
        self.ctl(&["stop"])
            .context("stopping the private RabbitMQ node")?;
        await_condition("the AMQP port to close", START_DEADLINE, || {
            !port_open(self.port)
        })
    }

    /// Messages waiting in `queue`, as the broker counts them.
    pub fn messages_in(&self, queue: &str) -> anyhow::Result<u64> {
        let listing = self.ctl(&["list_queues", "name", "messages", "--no-table-headers"])?;
        for line in listing.lines() {
            let mut fields = line.split_whitespace();
            if fields.next() == Some(queue) {
                let count = fields.next().context("list_queues gave no count")?;
                return count
                    .parse()
                    .with_context(|| format!("list_queues count {count:?}"));
            }
        }
        bail!("the broker has no queue {queue:?}: {listing}")
    }
}

// -------------------------------------------------------------------------------- Garage

/// A private single-node Garage store, configured as `scripts/services` configures
/// the development one, on ports of its own.
pub struct Garage {
    binary: PathBuf,
    config: PathBuf,
    dir: PathBuf,
    s3_port: u16,
    server: Option<Child>,
}

impl Garage {
    fn create(dir: &Path, binary: PathBuf) -> anyhow::Result<Self> {
        let (s3_port, rpc_port, admin_port) = (free_port()?, free_port()?, free_port()?);
        fs::create_dir_all(dir.join("meta"))?;
        fs::create_dir_all(dir.join("data"))?;
        let secret = random_hex(32)?;
        let config = dir.join("garage.toml");
        fs::write(
            &config,
            format!(
                r#"metadata_dir = "{meta}"
data_dir = "{data}"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:{rpc_port}"
rpc_public_addr = "127.0.0.1:{rpc_port}"
rpc_secret = "{secret}"

[s3_api]
api_bind_addr = "127.0.0.1:{s3_port}"
s3_region = "{S3_REGION}"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:{admin_port}"
"#,
                meta = dir.join("meta").display(),
                data = dir.join("data").display(),
            ),
        )?;
        Ok(Self {
            binary,
            config,
            dir: dir.to_owned(),
            s3_port,
            server: None,
        })
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.s3_port)
    }

    fn cli(&self, args: &[&str]) -> anyhow::Result<String> {
        let output = run(Command::new(&self.binary)
            .arg("-c")
            .arg(&self.config)
            .args(args)
            .env_remove("GARAGE_RPC_HOST")
            .env_remove("GARAGE_RPC_SECRET"))?;
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Starts the server and waits until its S3 port and RPC answer. Its pid goes to
    /// `garage.pid` for the wrapper script's clean-up.
    pub fn start(&mut self) -> anyhow::Result<()> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("garage.log"))?;
        let server = Command::new(&self.binary)
            .arg("-c")
            .arg(&self.config)
            .arg("server")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting the private Garage")?;
        fs::write(self.dir.join("garage.pid"), server.id().to_string())?;
        self.server = Some(server);
        await_condition("the private Garage to answer", START_DEADLINE, || {
            port_open(self.s3_port) && self.cli(&["status"]).is_ok()
        })
    }

    /// Kills the server (an outage, not a shutdown) and waits for it to be gone.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(mut server) = self.server.take() {
            server.kill().context("killing the private Garage")?;
            server.wait()?;
        }
        Ok(())
    }

    /// A layout with our one node, the access key and the bucket, as `scripts/services`
    /// sets up the development store.
    fn set_up_store(&self) -> anyhow::Result<()> {
        let node_id = self.cli(&["node", "id", "-q"])?;
        let node_id = node_id
            .trim()
            .split('@')
            .next()
            .context("garage node id printed nothing")?
            .to_owned();
        self.cli(&["layout", "assign", "-z", "dc1", "-c", "1G", &node_id])?;
        self.cli(&["layout", "apply", "--version", "1"])?;
        await_condition("the Garage cluster to be healthy", START_DEADLINE, || {
            self.cli(&["health", "-q"]).is_ok()
        })?;
        self.cli(&[
            "key",
            "import",
            "--yes",
            "-n",
            "dsa-chaos",
            ACCESS_KEY_ID,
            SECRET_ACCESS_KEY,
        ])?;
        self.cli(&["bucket", "create", S3_BUCKET])?;
        self.cli(&[
            "bucket",
            "allow",
            "--read",
            "--write",
            "--owner",
            S3_BUCKET,
            "--key",
            ACCESS_KEY_ID,
        ])?;
        Ok(())
    }
}

impl Drop for Services {
    /// Stops every service, also when the run failed; errors are printed, since a
    /// clean-up that fails must not hide why the run stopped.
    fn drop(&mut self) {
        if let Err(error) = self.garage.stop() {
            eprintln!("chaos: {error:#}");
        }
        if port_open(self.rabbitmq.port) {
            if let Err(error) = self.rabbitmq.stop() {
                eprintln!("chaos: {error:#}");
            }
        }
        if self.postgres.is_running() {
            if let Err(error) = self.postgres.stop("fast") {
                eprintln!("chaos: {error:#}");
            }
        }
    }
}
