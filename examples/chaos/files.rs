//! The files the chaos run submits, and the rows each must give, computed here from
//! what was written with the library's public hashing (row hash: sha256 of the row's
//! RFC 8785 JSON; positional ids `{sheet}:{n}` in file order; the tree hash chaining
//! both), never from what the service stored.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;
use dsa_ingest::import::hash::{canonical_json, row_hash, RowHash, TreeHasher};
use serde_json::{Map, Value};

/// A small deterministic generator (SplitMix64): the same seed gives the same files
/// and the same faults, so a failing run can be replayed with `--seed`.
pub struct Random(u64);

impl Random {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `low..=high`.
    pub fn between(&mut self, low: u64, high: u64) -> u64 {
        low + self.next_u64() % (high - low + 1)
    }

    /// True with probability `percent` in 100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.next_u64() % 100 < percent
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.next_u64() as usize % items.len()]
    }

    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, self.between(0, i as u64) as usize);
        }
    }
}

/// One file of the run and what importing it must give.
pub struct ChaosFile {
    pub name: String,
    pub path: PathBuf,
    /// Submitted with `--skip-bad-rows`: it has rows the import must leave out.
    pub skip_bad_rows: bool,
    /// Submitted twice (to the same dataset): both runs must give the same rows.
    pub duplicate: bool,
    pub expected: ExpectedRows,
}

impl ChaosFile {
    /// Each file has a dataset of its own; a duplicate's second run goes to the same.
    pub fn dataset(&self) -> String {
        format!("chaos-{}", self.name)
    }
}

/// The rows of a file as the import must store them.
pub struct ExpectedRows {
    /// Sheet names in file order (a CSV has one: its base name).
    pub sheets: Vec<String>,
    /// `(logical_row_id, row_hash)` in file order, bad rows left out.
    pub rows: Vec<(String, RowHash)>,
    /// Rows the file has that the import must reject.
    pub bad_rows: u64,
}

impl ExpectedRows {
    pub fn tree_hash(&self) -> String {
        let mut tree = TreeHasher::new();
        for (id, hash) in &self.rows {
            tree.push(id, hash);
        }
        tree.to_hex()
    }

    /// The place of `logical_row_id` in file order: sheet first, then row number.
    pub fn order_key(&self, logical_row_id: &str) -> (usize, u64, String) {
        let (sheet, n) = logical_row_id
            .rsplit_once(':')
            .unwrap_or((logical_row_id, ""));
        let place = self
            .sheets
            .iter()
            .position(|name| name == sheet)
            .unwrap_or(usize::MAX);
        (
            place,
            n.parse().unwrap_or(u64::MAX),
            logical_row_id.to_owned(),
        )
    }
}

/// Sizes of the generated set.
pub struct FileSizes {
    pub files: usize,
    pub min_rows: u64,
    pub max_rows: u64,
}

/// Writes the files into `dir`: about two in five are xlsx workbooks of one to three
/// sheets, the rest CSV; about one in four has bad rows (and is submitted with
/// `--skip-bad-rows`); about one in six is submitted twice.
pub fn generate(
    dir: &Path,
    sizes: &FileSizes,
    random: &mut Random,
) -> anyhow::Result<Vec<ChaosFile>> {
    std::fs::create_dir_all(dir)?;
    let mut files = Vec::with_capacity(sizes.files);
    for index in 1..=sizes.files {
        let rows = random.between(sizes.min_rows, sizes.max_rows);
        let skip_bad_rows = random.chance(25);
        let duplicate = random.chance(16) || index == 2;
        let xlsx = random.chance(40) || index == 1;
        let name = format!("f{index:03}");
        let (path, expected) = if xlsx {
            let path = dir.join(format!("{name}.xlsx"));
            let sheets = random.between(1, 3) as usize;
            let expected = write_workbook(&path, rows, sheets, skip_bad_rows, random)
                .with_context(|| format!("writing {}", path.display()))?;
            (path, expected)
        } else {
            let path = dir.join(format!("{name}.csv"));
            let text = csv_text(rows, skip_bad_rows, random);
            std::fs::write(&path, &text)?;
            (path, expected_of_csv(&name, &text)?)
        };
        files.push(ChaosFile {
            name,
            path,
            skip_bad_rows,
            duplicate,
            expected,
        });
    }
    Ok(files)
}

const CSV_HEADER: [&str; 6] = ["id", "name", "city", "amount", "flag", "note"];
const CITIES: [&str; 6] = ["Oslo", "Zürich", "São Paulo", "Kraków", "Nairobi", "Ōsaka"];

/// A CSV of `rows` data rows. Some fields need quoting (commas, quotes, line breaks),
/// some are empty; with `bad_rows`, a few rows have one field too many.
fn csv_text(rows: u64, bad_rows: bool, random: &mut Random) -> String {
    let mut text = CSV_HEADER.join(",");
    text.push('\n');
    for n in 1..=rows {
        let id = random.next_u64() % 1_000_000_000;
        let city = random.pick(&CITIES);
        let amount = format!("{}.{:02}", random.between(0, 99_999), random.between(0, 99));
        let flag = if random.chance(50) { "true" } else { "" };
        let note = match random.between(0, 9) {
            0 => "\"quoted, with a comma\"".to_owned(),
            1 => "\"she said \"\"hi\"\"\"".to_owned(),
            2 => "\"two\nlines\"".to_owned(),
            _ => format!("note {n}"),
        };
        let _ = write!(text, "{id},name{id:x},{city},{amount},{flag},{note}");
        if bad_rows && random.chance(2) {
            text.push_str(",one field too many");
        }
        text.push('\n');
    }
    text
}

/// The rows of a CSV file, read from its text by a reader of its own (RFC 4180:
/// comma separated, double quotes around fields with commas, quotes or line breaks,
/// a quote inside doubled). A record whose field count differs from the header's is a
/// bad row: left out, but still counted in `n`.
pub fn expected_of_csv(sheet: &str, text: &str) -> anyhow::Result<ExpectedRows> {
    let mut records = parse_csv(text)?.into_iter();
    let header = records.next().context("the CSV has no header")?;
    let mut rows = Vec::new();
    let mut bad_rows = 0;
    for (index, record) in records.enumerate() {
        if record.len() != header.len() {
            bad_rows += 1;
            continue;
        }
        let object: Map<String, Value> = header
            .iter()
            .cloned()
            .zip(record.into_iter().map(Value::String))
            .collect();
        rows.push((format!("{sheet}:{}", index + 1), hash_of(object)?));
    }
    Ok(ExpectedRows {
        sheets: vec![sheet.to_owned()],
        rows,
        bad_rows,
    })
}

fn parse_csv(text: &str) -> anyhow::Result<Vec<Vec<String>>> {
    let mut records = Vec::new();
    let mut record = Vec::new();
    let mut field = String::new();
    let mut chars = text.chars().peekable();
    let mut quoted = false;
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            (true, '"') => quoted = false,
            (true, c) => field.push(c),
            (false, '"') if field.is_empty() => quoted = true,
            (false, ',') => record.push(std::mem::take(&mut field)),
            (false, '\n') => {
                record.push(std::mem::take(&mut field));
                records.push(std::mem::take(&mut record));
            }
            (false, c) => field.push(c),
        }
    }
    anyhow::ensure!(!quoted, "the CSV ends inside a quoted field");
    if !field.is_empty() || !record.is_empty() {
        record.push(field);
        records.push(record);
    }
    Ok(records)
}

fn hash_of(object: Map<String, Value>) -> anyhow::Result<RowHash> {
    Ok(row_hash(&canonical_json(&Value::Object(object))?))
}

const SHEET_HEADER: [&str; 5] = ["id", "label", "price", "active", "comment"];

/// A workbook whose `rows` data rows are spread over `sheets` sheets: numbers
/// (integral and not), strings, booleans and empty cells (null). With `bad_rows`, a
/// few rows have a value right of the header's last column, which the import refuses.
/// The expected rows are those values as the import must type them.
fn write_workbook(
    path: &Path,
    rows: u64,
    sheets: usize,
    bad_rows: bool,
    random: &mut Random,
) -> anyhow::Result<ExpectedRows> {
    let mut workbook = rust_xlsxwriter::Workbook::new();
    let mut expected = ExpectedRows {
        sheets: Vec::new(),
        rows: Vec::new(),
        bad_rows: 0,
    };
    let per_sheet = (rows / sheets as u64).max(1);
    for sheet_index in 1..=sheets {
        let sheet_name = format!("sheet{sheet_index}");
        let sheet = workbook.add_worksheet();
        sheet.set_name(&sheet_name)?;
        for (column, name) in SHEET_HEADER.iter().enumerate() {
            sheet.write_string(0, column as u16, *name)?;
        }
        for n in 1..=per_sheet {
            let row = n as u32;
            let id = random.between(1, 10_000_000) as f64;
            let price = random.between(0, 1_000_000) as f64 / 8.0;
            let label = format!("item {} {}", random.pick(&CITIES), n);
            let active = random.chance(50);
            sheet.write_number(row, 0, id)?;
            sheet.write_string(row, 1, &label)?;
            sheet.write_number(row, 2, price)?;
            sheet.write_boolean(row, 3, active)?;
            // The comment is empty in half the rows: the last cell of the row is then
            // missing altogether, which the import must read as null.
            let comment = if random.chance(50) {
                let text = format!("c{}", random.next_u64() % 1000);
                sheet.write_string(row, 4, &text)?;
                Value::String(text)
            } else {
                Value::Null
            };
            if bad_rows && random.chance(2) {
                sheet.write_string(row, 6, "outside the header")?;
                expected.bad_rows += 1;
                continue;
            }
            let object: Map<String, Value> = SHEET_HEADER
                .iter()
                .map(|name| name.to_string())
                .zip([
                    Value::from(id),
                    Value::String(label),
                    Value::from(price),
                    Value::Bool(active),
                    comment,
                ])
                .collect();
            expected
                .rows
                .push((format!("{sheet_name}:{n}"), hash_of(object)?));
        }
        expected.sheets.push(sheet_name);
    }
    workbook.save(path)?;
    Ok(expected)
}
