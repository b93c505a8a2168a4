# syntax=docker/dockerfile:1

# The build stage compiles the release binary; the cache mounts keep the crate registry
# and the target directory between builds, so a change to src/ rebuilds only this crate.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# The migrations are embedded into the binary at compile time (sqlx::migrate!).
COPY migrations ./migrations
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin dsa-ingest \
    && cp target/release/dsa-ingest /usr/local/bin/dsa-ingest

# The runtime stage holds the binary and the CA certificates that TLS to S3, PostgreSQL
# and the broker needs; nothing else.
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 dsa \
    && useradd --system --uid 10001 --gid dsa --home-dir /nonexistent --shell /usr/sbin/nologin dsa
COPY --from=build /usr/local/bin/dsa-ingest /usr/local/bin/dsa-ingest
# Numeric, so that Kubernetes can check runAsNonRoot without resolving the name.
USER 10001:10001
# In a container the health and metrics endpoints must be reachable from outside.
ENV METRICS_ADDR=0.0.0.0:9464 \
    RUST_LOG=warn,dsa_ingest=info
EXPOSE 9464
ENTRYPOINT ["dsa-ingest"]
CMD ["consume"]
