//! Typed, FHIR-aware reads of one `to_jsonb(row)` object.
//!
//! Each accessor treats an absent column like SQL NULL, so a mapper works the same whether a
//! table lacks an optional column or has it NULL.

use super::{json_type, Ctx, MapError, Row};
use chrono::{DateTime, Datelike, FixedOffset, NaiveDate, NaiveDateTime, SecondsFormat, TimeDelta};
use serde_json::{Number, Value};

/// FHIR caps strings at 1 MiB; refusing here names the column instead of getting a bare 400.
pub const MAX_TEXT_BYTES: usize = 1024 * 1024;
/// FHIR's date grammar has four-digit years; years before 1000 are accepted by the grammar
/// but in clinical data are always typos, and strict servers disagree about them.
pub const MIN_YEAR: i32 = 1000;
pub const MAX_YEAR: i32 = 9999;
const MAX_OFFSET_SECONDS: i32 = 14 * 3600;

const INFINITE: &str = "is infinite, which FHIR cannot represent";
const DATE_OUT_OF_RANGE: &str = "is out of range (years 1000 to 9999)";
const NOT_A_DATE: &str = "is not a valid date (expected YYYY-MM-DD)";
const NOT_A_CALENDAR_DATE: &str = "is not a real calendar date";
const NOT_A_DATE_TIME: &str = "is not a valid date-time (expected RFC 3339)";
const NO_OFFSET: &str = "has no time zone offset, which FHIR requires (use timestamptz)";

/// The row must be a JSON object before any field can be read.
pub fn as_row<'v>(value: &'v Value, ctx: &Ctx) -> Result<&'v Row, MapError> {
    value
        .as_object()
        .ok_or_else(|| MapError::not_an_object(ctx))
}

/// Field reader bound to one row, so that every error names the row and the field.
pub struct Fields<'a> {
    row: &'a Row,
    ctx: Ctx<'a>,
    /// Prepended to field names in errors, for rows read on behalf of another (child) row.
    prefix: &'a str,
}

impl<'a> Fields<'a> {
    pub fn new(row: &'a Row, ctx: &Ctx<'a>) -> Self {
        Fields {
            row,
            ctx: *ctx,
            prefix: "",
        }
    }

    /// A child row (e.g. one of a patient's other identifiers) reported under the parent's
    /// table and key, with `prefix` telling which child table the field belongs to.
    pub fn child(row: &'a Row, ctx: &Ctx<'a>, prefix: &'a str) -> Self {
        Fields {
            row,
            ctx: *ctx,
            prefix,
        }
    }

    pub fn ctx(&self) -> &Ctx<'a> {
        &self.ctx
    }

    pub fn missing(&self, field: &str) -> MapError {
        MapError::missing(&self.ctx, &self.name(field))
    }

    pub fn invalid(&self, field: &str, reason: impl Into<String>) -> MapError {
        MapError::invalid(&self.ctx, &self.name(field), reason)
    }

    fn name(&self, field: &str) -> String {
        format!("{}{field}", self.prefix)
    }

    fn get(&self, field: &str) -> Option<&'a Value> {
        match self.row.get(field) {
            None | Some(Value::Null) => None,
            Some(value) => Some(value),
        }
    }

    fn wrong_type(&self, field: &str, expected: &str, got: &Value) -> MapError {
        self.invalid(
            field,
            format!(
                "has the wrong JSON type (expected {expected}, got {})",
                json_type(got)
            ),
        )
    }

    /// Whether the column holds anything at all (used for foreign keys whose value the
    /// mapper does not need, only their presence).
    pub fn is_present(&self, field: &str) -> bool {
        match self.get(field) {
            None => false,
            Some(Value::String(s)) => !s.trim().is_empty(),
            Some(_) => true,
        }
    }

    /// Trimmed text; blank counts as absent because FHIR forbids empty strings. Numbers are
    /// accepted as their decimal text since identifier and postal-code columns are often
    /// numeric.
    pub fn text(&self, field: &str) -> Result<Option<String>, MapError> {
        match self.get(field) {
            None => Ok(None),
            Some(Value::String(s)) => self.clean_text(field, s),
            Some(Value::Number(n)) => Ok(Some(n.to_string())),
            Some(other) => Err(self.wrong_type(field, "text", other)),
        }
    }

    pub fn required_text(&self, field: &str) -> Result<String, MapError> {
        self.text(field)?.ok_or_else(|| self.missing(field))
    }

    fn clean_text(&self, field: &str, s: &str) -> Result<Option<String>, MapError> {
        let trimmed = s.trim();
        if trimmed.is_empty() {
            Ok(None)
        } else if trimmed.len() > MAX_TEXT_BYTES {
            Err(self.invalid(field, "is longer than FHIR allows (1 MiB)"))
        } else {
            Ok(Some(trimmed.to_owned()))
        }
    }

    /// Text that must be a FHIR `uri`, whose grammar forbids whitespace.
    pub fn uri(&self, field: &str) -> Result<Option<String>, MapError> {
        match self.text(field)? {
            Some(uri) if uri.chars().any(char::is_whitespace) => {
                Err(self.invalid(field, "is not a valid URI (it contains whitespace)"))
            }
            other => Ok(other),
        }
    }

    pub fn required_uri(&self, field: &str) -> Result<String, MapError> {
        self.uri(field)?.ok_or_else(|| self.missing(field))
    }

    /// A whole number. Integral floats and cleanly parsing strings are accepted because
    /// numeric columns and text columns holding numbers both occur in the wild.
    pub fn integer(&self, field: &str) -> Result<Option<i64>, MapError> {
        match self.get(field) {
            None => Ok(None),
            Some(Value::Number(n)) => number_to_i64(n)
                .map(Some)
                .ok_or_else(|| self.invalid(field, "is not a whole number in 64-bit range")),
            Some(Value::String(s)) => {
                let s = s.trim();
                if s.is_empty() {
                    return Ok(None);
                }
                s.parse::<i64>()
                    .map(Some)
                    .map_err(|_| self.invalid(field, "is not a whole number"))
            }
            Some(other) => Err(self.wrong_type(field, "number", other)),
        }
    }

    pub fn required_integer(&self, field: &str) -> Result<i64, MapError> {
        self.integer(field)?.ok_or_else(|| self.missing(field))
    }

    /// A required whole number within `min..=max`; `unit` only decorates the message.
    pub fn required_integer_in(
        &self,
        field: &str,
        min: i64,
        max: i64,
        unit: &str,
    ) -> Result<i64, MapError> {
        let value = self.required_integer(field)?;
        if (min..=max).contains(&value) {
            Ok(value)
        } else {
            let unit = if unit.is_empty() {
                String::new()
            } else {
                format!(" {unit}")
            };
            Err(self.invalid(field, format!("is out of range ({min} to {max}{unit})")))
        }
    }

    pub fn boolean(&self, field: &str) -> Result<Option<bool>, MapError> {
        match self.get(field) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(self.wrong_type(field, "boolean", other)),
        }
    }

    /// A calendar date for a FHIR `date` element; format it with [`fhir_date`].
    pub fn date(&self, field: &str) -> Result<Option<NaiveDate>, MapError> {
        match self.get(field) {
            None => Ok(None),
            Some(Value::String(s)) => parse_date(s)
                .map(Some)
                .map_err(|reason| self.invalid(field, reason)),
            Some(other) => Err(self.wrong_type(field, "date string", other)),
        }
    }

    /// A FHIR `dateTime`, already rendered. A bare date is valid FHIR dateTime and is kept as
    /// is; a timestamp keeps its offset and gains seconds if it lacked them.
    pub fn date_time(&self, field: &str) -> Result<Option<String>, MapError> {
        match self.get(field) {
            None => Ok(None),
            Some(Value::String(s)) => parse_date_time(s)
                .map(Some)
                .map_err(|reason| self.invalid(field, reason)),
            Some(other) => Err(self.wrong_type(field, "timestamp string", other)),
        }
    }

    pub fn required_date_time(&self, field: &str) -> Result<String, MapError> {
        self.date_time(field)?.ok_or_else(|| self.missing(field))
    }
}

pub fn fhir_date(date: NaiveDate) -> String {
    date.format("%Y-%m-%d").to_string()
}

fn number_to_i64(n: &Number) -> Option<i64> {
    if let Some(i) = n.as_i64() {
        return Some(i);
    }
    // 2^63 is exactly representable, so this bound admits every f64 that fits in an i64.
    const LIMIT: f64 = 9_223_372_036_854_775_808.0;
    match n.as_f64() {
        Some(x) if x.is_finite() && x.fract() == 0.0 && (-LIMIT..LIMIT).contains(&x) => {
            Some(x as i64)
        }
        _ => None,
    }
}

fn is_infinity(s: &str) -> bool {
    ["infinity", "+infinity", "-infinity"]
        .iter()
        .any(|word| s.eq_ignore_ascii_case(word))
}

/// PostgreSQL prints years past 9999 with more digits and years before 1 with a " BC"
/// suffix; both are real values that FHIR's four-digit years cannot carry, which is a
/// different complaint from a malformed string.
fn year_out_of_range_syntax(s: &str) -> bool {
    let leading_digits = s.bytes().take_while(u8::is_ascii_digit).count();
    s.ends_with(" BC")
        || s.ends_with(" bc")
        || (leading_digits > 4 && s.as_bytes().get(leading_digits) == Some(&b'-'))
}

fn parse_date(raw: &str) -> Result<NaiveDate, &'static str> {
    let s = raw.trim();
    if is_infinity(s) {
        return Err(INFINITE);
    }
    if year_out_of_range_syntax(s) {
        return Err(DATE_OUT_OF_RANGE);
    }
    let b = s.as_bytes();
    let part = |from: usize, to: usize| -> Option<u32> {
        s.get(from..to)
            .filter(|p| p.bytes().all(|c| c.is_ascii_digit()))
            .and_then(|p| p.parse().ok())
    };
    let (year, month, day) = match (b.len(), b.get(4), b.get(7)) {
        (10, Some(b'-'), Some(b'-')) => match (part(0, 4), part(5, 7), part(8, 10)) {
            (Some(y), Some(m), Some(d)) => (i32::try_from(y).map_err(|_| NOT_A_DATE)?, m, d),
            _ => return Err(NOT_A_DATE),
        },
        _ => return Err(NOT_A_DATE),
    };
    if !(MIN_YEAR..=MAX_YEAR).contains(&year) {
        return Err(DATE_OUT_OF_RANGE);
    }
    NaiveDate::from_ymd_opt(year, month, day).ok_or(NOT_A_CALENDAR_DATE)
}

fn parse_date_time(raw: &str) -> Result<String, &'static str> {
    let s = raw.trim();
    if is_infinity(s) {
        return Err(INFINITE);
    }
    if year_out_of_range_syntax(s) {
        return Err(DATE_OUT_OF_RANGE);
    }
    if s.len() == 10 {
        return parse_date(s).map(fhir_date).map_err(|reason| {
            if reason == NOT_A_DATE {
                NOT_A_DATE_TIME
            } else {
                reason
            }
        });
    }
    let mut parsed = parse_with_offset(s)?;
    // FHIR offsets stop at +-14:00 while PostgreSQL accepts up to +-15:59; the same instant
    // in UTC is always expressible.
    if parsed.offset().local_minus_utc().abs() > MAX_OFFSET_SECONDS {
        parsed = parsed.to_utc().fixed_offset();
    }
    if !(MIN_YEAR..=MAX_YEAR).contains(&parsed.year()) {
        return Err(DATE_OUT_OF_RANGE);
    }
    Ok(parsed.to_rfc3339_opts(SecondsFormat::AutoSi, false))
}

fn parse_with_offset(s: &str) -> Result<DateTime<FixedOffset>, &'static str> {
    if let Ok(dt) = DateTime::parse_from_rfc3339(s) {
        return Ok(dt);
    }
    // PostgreSQL prints historic local-mean-time offsets with seconds ("+00:19:32"), which
    // neither RFC 3339 nor FHIR can express; the same instant in UTC can.
    if let Some((local, offset_seconds)) = split_offset_with_seconds(s) {
        return parse_naive(local)
            .and_then(|naive| naive.checked_sub_signed(TimeDelta::seconds(offset_seconds)))
            .map(|utc| utc.and_utc().fixed_offset())
            .ok_or(NOT_A_DATE_TIME);
    }
    if parse_naive(s).is_some() {
        return Err(NO_OFFSET);
    }
    Err(NOT_A_DATE_TIME)
}

fn parse_naive(s: &str) -> Option<NaiveDateTime> {
    [
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%dT%H:%M",
    ]
    .iter()
    .find_map(|format| NaiveDateTime::parse_from_str(s, format).ok())
}

/// Splits a trailing `+HH:MM:SS` / `-HH:MM:SS` offset off, returning it in seconds east of UTC.
fn split_offset_with_seconds(s: &str) -> Option<(&str, i64)> {
    let split = s.len().checked_sub(9)?;
    let tail = s.as_bytes().get(split..)?;
    let sign = match tail.first()? {
        b'+' => 1,
        b'-' => -1,
        _ => return None,
    };
    let digit = |i: usize| -> Option<i64> {
        tail.get(i)
            .filter(|c| c.is_ascii_digit())
            .map(|c| i64::from(c - b'0'))
    };
    if tail.get(3) != Some(&b':') || tail.get(6) != Some(&b':') {
        return None;
    }
    let hours = digit(1)? * 10 + digit(2)?;
    let minutes = digit(4)? * 10 + digit(5)?;
    let seconds = digit(7)? * 10 + digit(8)?;
    if hours > 23 || minutes > 59 || seconds > 59 {
        return None;
    }
    // The tail is all ASCII, so `split` is a char boundary.
    let local = s.get(..split)?;
    Some((local, sign * (hours * 3600 + minutes * 60 + seconds)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ctx() -> Ctx<'static> {
        Ctx {
            table: "public.t",
            key: "1",
            identifier_base: "urn:fhir-sync",
        }
    }

    fn row(v: Value) -> Row {
        match v {
            Value::Object(m) => m,
            _ => Row::new(),
        }
    }

    fn reason(e: MapError) -> String {
        match e {
            MapError::InvalidField { reason, .. } => reason,
            other => format!("not an InvalidField: {other:?}"),
        }
    }

    #[test]
    fn as_row_rejects_non_objects() {
        let c = ctx();
        assert!(as_row(&json!({"a": 1}), &c).is_ok());
        for v in [json!(null), json!([1]), json!("x"), json!(3)] {
            assert_eq!(as_row(&v, &c), Err(MapError::not_an_object(&c)));
        }
    }

    #[test]
    fn text_trims_and_treats_blank_as_absent() {
        let r = row(json!({"a": "  x y ", "b": "   ", "c": null, "n": 12, "f": 1.5, "u": "李🩺"}));
        let c = ctx();
        let f = Fields::new(&r, &c);
        assert_eq!(f.text("a"), Ok(Some("x y".into())));
        assert_eq!(f.text("b"), Ok(None));
        assert_eq!(f.text("c"), Ok(None));
        assert_eq!(f.text("absent"), Ok(None));
        assert_eq!(f.text("n"), Ok(Some("12".into())));
        assert_eq!(f.text("f"), Ok(Some("1.5".into())));
        assert_eq!(f.text("u"), Ok(Some("李🩺".into())));
        assert_eq!(f.required_text("b"), Err(MapError::missing(&c, "b")));
    }

    #[test]
    fn text_rejects_wrong_types_without_echoing_them() {
        let r = row(json!({"a": true, "b": ["secret"], "c": {"x": "secret"}}));
        let c = ctx();
        let f = Fields::new(&r, &c);
        for field in ["a", "b", "c"] {
            let e = f.text(field).unwrap_err();
            assert_eq!(e.field(), Some(field));
            assert!(!e.to_string().contains("secret"), "{e}");
        }
        assert_eq!(
            f.text("b").unwrap_err().to_string(),
            "public.t row 1: field \"b\" has the wrong JSON type (expected text, got array)"
        );
    }

    #[test]
    fn text_rejects_huge_strings() {
        let r = row(json!({"a": "é".repeat(MAX_TEXT_BYTES), "b": "x".repeat(MAX_TEXT_BYTES)}));
        let c = ctx();
        let f = Fields::new(&r, &c);
        assert_eq!(
            reason(f.text("a").unwrap_err()),
            "is longer than FHIR allows (1 MiB)"
        );
        assert_eq!(
            f.text("b").map(|s| s.map(|s| s.len())),
            Ok(Some(MAX_TEXT_BYTES))
        );
    }

    #[test]
    fn uri_rejects_whitespace() {
        let r = row(json!({"a": "urn:x y", "b": " urn:ok ", "c": ""}));
        let c = ctx();
        let f = Fields::new(&r, &c);
        assert!(reason(f.uri("a").unwrap_err()).contains("not a valid URI"));
        assert_eq!(f.uri("b"), Ok(Some("urn:ok".into())));
        assert_eq!(f.required_uri("c"), Err(MapError::missing(&c, "c")));
    }

    #[test]
    fn child_fields_are_prefixed() {
        let r = row(json!({}));
        let c = ctx();
        let f = Fields::child(&r, &c, "kids.");
        assert_eq!(f.required_text("v").unwrap_err().field(), Some("kids.v"));
    }

    #[test]
    fn integers() {
        let r = row(json!({
            "i": 120, "neg": -5, "f": 120.0, "frac": 120.5, "big": u64::MAX, "s": " 80 ",
            "junk": "80x", "blank": "", "sinf": "inf", "b": true, "huge": 1e300
        }));
        let c = ctx();
        let f = Fields::new(&r, &c);
        assert_eq!(f.integer("i"), Ok(Some(120)));
        assert_eq!(f.integer("neg"), Ok(Some(-5)));
        assert_eq!(f.integer("f"), Ok(Some(120)));
        assert_eq!(f.integer("s"), Ok(Some(80)));
        assert_eq!(f.integer("blank"), Ok(None));
        assert_eq!(f.integer("absent"), Ok(None));
        for bad in ["frac", "big", "junk", "sinf", "b", "huge"] {
            assert!(f.integer(bad).is_err(), "{bad}");
        }
        assert_eq!(
            f.required_integer("absent"),
            Err(MapError::missing(&c, "absent"))
        );
        assert_eq!(f.required_integer_in("i", 1, 400, "mmHg"), Ok(120));
        assert_eq!(
            f.required_integer_in("i", 1, 100, "mmHg")
                .unwrap_err()
                .to_string(),
            "public.t row 1: field \"i\" is out of range (1 to 100 mmHg)"
        );
        assert_eq!(
            reason(f.required_integer_in("neg", 0, 9, "").unwrap_err()),
            "is out of range (0 to 9)"
        );
    }

    #[test]
    fn booleans() {
        let r = row(json!({"t": true, "f": false, "s": "true", "n": 1}));
        let c = ctx();
        let f = Fields::new(&r, &c);
        assert_eq!(f.boolean("t"), Ok(Some(true)));
        assert_eq!(f.boolean("f"), Ok(Some(false)));
        assert_eq!(f.boolean("absent"), Ok(None));
        assert!(f.boolean("s").is_err());
        assert!(f.boolean("n").is_err());
    }

    #[test]
    fn dates_accept_only_real_four_digit_dates() {
        assert_eq!(
            parse_date("2024-05-01").map(fhir_date),
            Ok("2024-05-01".into())
        );
        assert_eq!(
            parse_date("1000-01-01").map(fhir_date),
            Ok("1000-01-01".into())
        );
        assert_eq!(
            parse_date("9999-12-31").map(fhir_date),
            Ok("9999-12-31".into())
        );
        assert_eq!(
            parse_date("2024-02-29").map(fhir_date),
            Ok("2024-02-29".into())
        );
        assert_eq!(parse_date("2023-02-29"), Err(NOT_A_CALENDAR_DATE));
        assert_eq!(parse_date("2024-13-01"), Err(NOT_A_CALENDAR_DATE));
        assert_eq!(parse_date("2024-00-10"), Err(NOT_A_CALENDAR_DATE));
        assert_eq!(parse_date("infinity"), Err(INFINITE));
        assert_eq!(parse_date("-infinity"), Err(INFINITE));
        assert_eq!(parse_date("10000-01-01"), Err(DATE_OUT_OF_RANGE));
        assert_eq!(parse_date("275760-09-13"), Err(DATE_OUT_OF_RANGE));
        assert_eq!(parse_date("0044-03-15 BC"), Err(DATE_OUT_OF_RANGE));
        assert_eq!(parse_date("0999-12-31"), Err(DATE_OUT_OF_RANGE));
        assert_eq!(parse_date("0000-01-01"), Err(DATE_OUT_OF_RANGE));
        for bad in [
            "",
            "2024-5-1",
            "2024/05/01",
            "20240501",
            "2024-05-01T10:00:00+00:00",
            "２０２４-05-01",
            "२०२४-०५-०१",
            "abcd-ef-gh",
            "-2024-05-01",
            "+2024-05-01",
        ] {
            assert_eq!(parse_date(bad), Err(NOT_A_DATE), "{bad}");
        }
    }

    #[test]
    fn date_field_errors_name_the_bound_not_the_value() {
        let r = row(json!({"d": "10000-01-01", "n": 20240501, "ok": "2024-05-01"}));
        let c = ctx();
        let f = Fields::new(&r, &c);
        assert_eq!(
            f.date("d").unwrap_err().to_string(),
            "public.t row 1: field \"d\" is out of range (years 1000 to 9999)"
        );
        assert!(f.date("n").is_err());
        assert_eq!(f.date("ok"), Ok(NaiveDate::from_ymd_opt(2024, 5, 1)));
        assert_eq!(f.date("absent"), Ok(None));
    }

    #[test]
    fn date_times_are_normalised() {
        let cases = [
            ("2024-05-01T10:00:00+00:00", "2024-05-01T10:00:00+00:00"),
            ("2024-05-01T10:00:00Z", "2024-05-01T10:00:00+00:00"),
            (
                "2024-05-01T10:00:00.5+02:00",
                "2024-05-01T10:00:00.500+02:00",
            ),
            (
                "2024-05-01T10:00:00.123456-09:30",
                "2024-05-01T10:00:00.123456-09:30",
            ),
            ("2024-05-01 10:00:00+00:00", "2024-05-01T10:00:00+00:00"),
            ("1900-01-01T00:00:00+00:19:32", "1899-12-31T23:40:28+00:00"),
            ("2024-05-01", "2024-05-01"),
            ("2024-05-01T10:00:00+14:00", "2024-05-01T10:00:00+14:00"),
            ("2024-05-01T10:00:00+15:30", "2024-04-30T18:30:00+00:00"),
            ("2024-05-01T10:00:00-14:30:00", "2024-05-02T00:30:00+00:00"),
            (
                "9999-12-31T23:59:59.999999+00:00",
                "9999-12-31T23:59:59.999999+00:00",
            ),
        ];
        for (input, expected) in cases {
            assert_eq!(parse_date_time(input).as_deref(), Ok(expected), "{input}");
        }
    }

    #[test]
    fn date_times_reject_what_fhir_cannot_hold() {
        assert_eq!(parse_date_time("infinity"), Err(INFINITE));
        assert_eq!(parse_date_time("-infinity"), Err(INFINITE));
        assert_eq!(
            parse_date_time("10000-01-01T00:00:00+00:00"),
            Err(DATE_OUT_OF_RANGE)
        );
        assert_eq!(
            parse_date_time("0044-03-15T00:00:00+00:00 BC"),
            Err(DATE_OUT_OF_RANGE)
        );
        assert_eq!(
            parse_date_time("0999-12-31T00:00:00+00:00"),
            Err(DATE_OUT_OF_RANGE)
        );
        assert_eq!(
            parse_date_time("1000-01-01T00:10:00+00:19:32"),
            Err(DATE_OUT_OF_RANGE)
        );
        assert_eq!(parse_date_time("2024-05-01T10:00:00"), Err(NO_OFFSET));
        assert_eq!(parse_date_time("2024-05-01 10:00:00.25"), Err(NO_OFFSET));
        assert_eq!(parse_date_time("2024-02-30"), Err(NOT_A_CALENDAR_DATE));
        for bad in [
            "",
            "now",
            "2024-05-01T25:00:00+00:00",
            "2024-05-01T10:00:00+25:00",
            "🩺",
            "2024-05-01T10:00:00+00:00 garbage",
            "1714557600",
        ] {
            assert_eq!(parse_date_time(bad), Err(NOT_A_DATE_TIME), "{bad}");
        }
    }

    #[test]
    fn date_time_field_wrong_type() {
        let r = row(json!({"t": 1714557600, "ok": "2024-05-01T10:00:00+00:00"}));
        let c = ctx();
        let f = Fields::new(&r, &c);
        assert!(reason(f.date_time("t").unwrap_err()).contains("wrong JSON type"));
        assert_eq!(
            f.required_date_time("ok"),
            Ok("2024-05-01T10:00:00+00:00".into())
        );
        assert_eq!(
            f.required_date_time("absent"),
            Err(MapError::missing(&c, "absent"))
        );
    }

    #[test]
    fn is_present() {
        let r = row(json!({"a": 0, "b": " ", "c": null, "d": "x"}));
        let c = ctx();
        let f = Fields::new(&r, &c);
        assert!(f.is_present("a"));
        assert!(!f.is_present("b"));
        assert!(!f.is_present("c"));
        assert!(f.is_present("d"));
        assert!(!f.is_present("absent"));
    }
}
