//! Cell values: calamine's cells as the typed values rows are made of (numbers,
//! booleans, text, ISO 8601 dates and durations), and column letters for messages.

use calamine::{Data, DataRef, ExcelDateTime};
use chrono::{Datelike, Timelike};

use crate::import::hash::write_json_number;

/// `A`, `B`, ..., `Z`, `AA`, ... for a 0-based column index.
pub fn column_letters(column: u32) -> String {
    let mut n = column as u64 + 1;
    let mut letters = Vec::new();
    while n > 0 {
        let rem = ((n - 1) % 26) as u8;
        letters.push(b'A' + rem);
        n = (n - 1) / 26;
    }
    letters.reverse();
    String::from_utf8(letters).expect("ASCII letters")
}

/// One cell's value with its type, as it goes into the row's JSON.
#[derive(Clone, Debug, PartialEq)]
pub enum CellValue {
    Null,
    Bool(bool),
    Number(f64),
    /// Strings, and dates, times and error values in their text form.
    Text(String),
}

/// An error cell's value as Excel shows it. calamine writes the one it calls
/// `GettingData` as `#DATA!`, which Excel never shows.
fn error_text(error: &calamine::CellErrorType) -> String {
    match error {
        calamine::CellErrorType::GettingData => "#GETTING_DATA".to_owned(),
        other => other.to_string(),
    }
}

impl CellValue {
    pub(super) fn from_ref(value: &DataRef<'_>) -> Self {
        match value {
            DataRef::Empty => CellValue::Null,
            DataRef::Int(number) => CellValue::Number(*number as f64),
            DataRef::Float(number) => number_or_text(*number),
            DataRef::String(text) => CellValue::Text(text.clone()),
            DataRef::SharedString(text) => CellValue::Text((*text).to_owned()),
            DataRef::Bool(flag) => CellValue::Bool(*flag),
            DataRef::DateTime(datetime) => CellValue::Text(excel_datetime_iso(datetime)),
            DataRef::DateTimeIso(text) => CellValue::Text(text.clone()),
            DataRef::DurationIso(text) => CellValue::Text(ods_duration(text)),
            DataRef::Error(error) => CellValue::Text(error_text(error)),
        }
    }

    pub(super) fn from_data(value: &Data) -> Self {
        match value {
            Data::Empty => CellValue::Null,
            Data::Int(number) => CellValue::Number(*number as f64),
            Data::Float(number) => number_or_text(*number),
            Data::String(text) => CellValue::Text(text.clone()),
            Data::Bool(flag) => CellValue::Bool(*flag),
            Data::DateTime(datetime) => CellValue::Text(excel_datetime_iso(datetime)),
            Data::DateTimeIso(text) => CellValue::Text(text.clone()),
            Data::DurationIso(text) => CellValue::Text(ods_duration(text)),
            Data::Error(error) => CellValue::Text(error_text(error)),
        }
    }

    /// The text a header cell gives as a column name.
    pub(super) fn header_text(&self) -> String {
        match self {
            CellValue::Null => String::new(),
            CellValue::Bool(flag) => flag.to_string(),
            CellValue::Number(number) => {
                let mut out = Vec::new();
                write_json_number(*number, &mut out);
                String::from_utf8(out).expect("numbers are ASCII")
            }
            CellValue::Text(text) => text.clone(),
        }
    }
}

/// JSON has no NaN or infinity; a reader that produced one gets its text form.
pub(super) fn number_or_text(number: f64) -> CellValue {
    if number.is_finite() {
        CellValue::Number(number)
    } else {
        CellValue::Text(number.to_string())
    }
}

/// ISO 8601 for a cell formatted as a date or time: `YYYY-MM-DD` for a whole day,
/// `HH:MM:SS` for a time of day alone (a value under one day), the two joined with `T`
/// otherwise; milliseconds only when present. Durations (`[h]:mm` formats) become
/// `PT…H…M…S`.
pub(super) fn excel_datetime_iso(value: &ExcelDateTime) -> String {
    if value.is_duration() {
        return duration_iso(value.as_f64() * 86_400.0);
    }
    let serial = value.as_f64();
    let Some(datetime) = value.as_datetime() else {
        // Out of chrono's range; the serial number is the honest value.
        let mut out = Vec::new();
        write_json_number(serial, &mut out);
        return String::from_utf8(out).expect("numbers are ASCII");
    };
    // Written digit by digit: a date column is a tenth of a typical sheet's cells, and
    // a strftime pattern is parsed again at every call.
    let millis = datetime.and_utc().timestamp_subsec_millis();
    let mut out = String::with_capacity(23);
    let date_part = !(0.0..1.0).contains(&serial);
    let time_part = !date_part || serial.fract() != 0.0;
    if date_part {
        let date = datetime.date();
        if !(0..=9999).contains(&date.year()) {
            // Signed years, as chrono's `%Y` writes them.
            out.push_str(&date.format("%Y").to_string());
        } else {
            push_padded(&mut out, date.year() as u32, 4);
        }
        out.push('-');
        push_padded(&mut out, date.month(), 2);
        out.push('-');
        push_padded(&mut out, date.day(), 2);
        if time_part {
            out.push('T');
        }
    }
    if time_part {
        let time = datetime.time();
        push_padded(&mut out, time.hour(), 2);
        out.push(':');
        push_padded(&mut out, time.minute(), 2);
        out.push(':');
        push_padded(&mut out, time.second(), 2);
        if millis != 0 {
            out.push('.');
            push_padded(&mut out, millis, 3);
        }
    }
    out
}

/// `value` as exactly `width` decimal digits, zero-padded; every caller's value fits
/// (a year up to 9999, a month to a second under 100, milliseconds under 1000).
fn push_padded(out: &mut String, value: u32, width: u32) {
    for place in (0..width).rev() {
        out.push(char::from(b'0' + (value / 10u32.pow(place) % 10) as u8));
    }
}

/// `PT{h}H{m}M{s}S` from seconds, rounded to the millisecond.
pub(super) fn duration_iso(seconds: f64) -> String {
    let negative = seconds < 0.0;
    let millis = (seconds.abs() * 1000.0).round() as u64;
    let (hours, rest) = (millis / 3_600_000, millis % 3_600_000);
    let (minutes, rest) = (rest / 60_000, rest % 60_000);
    let (whole, fraction) = (rest / 1000, rest % 1000);
    let sign = if negative { "-" } else { "" };
    if fraction == 0 {
        format!("{sign}PT{hours}H{minutes}M{whole}S")
    } else {
        format!("{sign}PT{hours}H{minutes}M{whole}.{fraction:03}S")
    }
}

/// ods keeps times of day as durations (`PT08H30M00S`); one under a day is given as
/// the time of day `08:30:00`, so the same cell reads alike from ods and from Excel's
/// formats. Longer durations are normalised like Excel's.
pub(super) fn ods_duration(text: &str) -> String {
    let Some(seconds) = parse_iso_duration(text) else {
        return text.to_owned();
    };
    if (0.0..86_400.0).contains(&seconds) {
        let millis = (seconds * 1000.0).round() as u64;
        let (h, m, s, ms) = (
            millis / 3_600_000,
            millis / 60_000 % 60,
            millis / 1000 % 60,
            millis % 1000,
        );
        if ms == 0 {
            format!("{h:02}:{m:02}:{s:02}")
        } else {
            format!("{h:02}:{m:02}:{s:02}.{ms:03}")
        }
    } else {
        duration_iso(seconds)
    }
}

/// Seconds in an ISO 8601 duration of hours, minutes and seconds (`PT1H2M3.5S`).
pub(super) fn parse_iso_duration(text: &str) -> Option<f64> {
    let (negative, text) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let mut rest = text.strip_prefix("PT")?;
    let mut seconds = 0.0;
    while !rest.is_empty() {
        let end = rest.find(|c: char| c.is_ascii_alphabetic())?;
        let value: f64 = rest[..end].parse().ok()?;
        seconds += value
            * match &rest[end..end + 1] {
                "H" => 3600.0,
                "M" => 60.0,
                "S" => 1.0,
                _ => return None,
            };
        rest = &rest[end + 1..];
    }
    Some(if negative { -seconds } else { seconds })
}
