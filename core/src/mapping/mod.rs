//! Source row -> FHIR R4 resource mapping.
//!
//! Everything here works on `to_jsonb(row)` output as plain `serde_json` values so it can be
//! unit tested without a PostgreSQL backend. Nothing in this module may panic on any input:
//! the mappers run inside a backend process, where a panic costs the whole worker.

pub mod custom;
pub mod encounter;
pub mod observation;
pub mod patient;
pub mod registry;
pub mod row;

use serde_json::{json, Map, Value};
use std::fmt;

/// One source row as `to_jsonb(row)` renders it.
pub type Row = Map<String, Value>;

/// Where a row comes from; every error and every derived identifier names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ctx<'a> {
    /// Schema-qualified source table, e.g. "public.blood_pressure".
    pub table: &'a str,
    /// The row's primary key as text.
    pub key: &'a str,
    /// Value of `fhir_sync.identifier_system`, e.g. "urn:fhir-sync".
    pub identifier_base: &'a str,
}

impl Ctx<'_> {
    /// The identifier the sync uses to find this row's resource on the server again.
    pub fn identifier(&self) -> Value {
        derived_identifier(self.identifier_base, self.table, self.key)
    }
}

/// References the caller already resolved, e.g. `{"reference": "Patient/123"}`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Refs {
    pub subject: Option<Value>,
    pub encounter: Option<Value>,
}

pub fn derived_system(base: &str, table: &str) -> String {
    format!("{}/{table}", base.trim_end_matches('/'))
}

pub fn derived_identifier(base: &str, table: &str, key: &str) -> Value {
    json!({ "system": derived_system(base, table), "value": key })
}

/// Why a row could not be turned into a resource.
///
/// Messages name the row and the field but never echo a field's value: the values are patient
/// data and these messages end up in `fhir_outbox.last_error`, `fhir_dlq` and server logs.
#[derive(Debug, Clone, PartialEq)]
pub enum MapError {
    /// A field the resource cannot do without is absent, null or blank.
    MissingField {
        table: String,
        key: String,
        field: String,
    },
    /// A field holds something FHIR cannot carry; `reason` completes the sentence
    /// `field "x" ...` and never contains the value itself.
    InvalidField {
        table: String,
        key: String,
        field: String,
        reason: String,
    },
    /// The row handed to the mapper is not a JSON object.
    NotAnObject { table: String, key: String },
    /// A user map function returned something that is not a usable resource; `reason`
    /// completes the sentence `the map function's result ...`.
    InvalidCustomOutput {
        table: String,
        key: String,
        reason: String,
    },
}

impl MapError {
    pub fn missing(ctx: &Ctx, field: &str) -> Self {
        MapError::MissingField {
            table: ctx.table.to_owned(),
            key: ctx.key.to_owned(),
            field: field.to_owned(),
        }
    }

    pub fn invalid(ctx: &Ctx, field: &str, reason: impl Into<String>) -> Self {
        MapError::InvalidField {
            table: ctx.table.to_owned(),
            key: ctx.key.to_owned(),
            field: field.to_owned(),
            reason: reason.into(),
        }
    }

    pub fn not_an_object(ctx: &Ctx) -> Self {
        MapError::NotAnObject {
            table: ctx.table.to_owned(),
            key: ctx.key.to_owned(),
        }
    }

    pub fn custom_output(ctx: &Ctx, reason: impl Into<String>) -> Self {
        MapError::InvalidCustomOutput {
            table: ctx.table.to_owned(),
            key: ctx.key.to_owned(),
            reason: reason.into(),
        }
    }

    pub fn table(&self) -> &str {
        match self {
            MapError::MissingField { table, .. }
            | MapError::InvalidField { table, .. }
            | MapError::NotAnObject { table, .. }
            | MapError::InvalidCustomOutput { table, .. } => table,
        }
    }

    pub fn key(&self) -> &str {
        match self {
            MapError::MissingField { key, .. }
            | MapError::InvalidField { key, .. }
            | MapError::NotAnObject { key, .. }
            | MapError::InvalidCustomOutput { key, .. } => key,
        }
    }

    #[cfg(test)]
    pub fn field(&self) -> Option<&str> {
        match self {
            MapError::MissingField { field, .. } | MapError::InvalidField { field, .. } => {
                Some(field)
            }
            MapError::NotAnObject { .. } | MapError::InvalidCustomOutput { .. } => None,
        }
    }
}

impl fmt::Display for MapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} row {}: ", self.table(), self.key())?;
        match self {
            MapError::MissingField { field, .. } => {
                write!(f, "field \"{field}\" is required but is missing or null")
            }
            MapError::InvalidField { field, reason, .. } => write!(f, "field \"{field}\" {reason}"),
            MapError::NotAnObject { .. } => f.write_str("the row is not a JSON object"),
            MapError::InvalidCustomOutput { reason, .. } => {
                write!(f, "the map function's result {reason}")
            }
        }
    }
}

impl std::error::Error for MapError {}

/// JSON type names for messages: the type of a bad value is safe to show, the value is not.
pub(crate) fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// FHIR forbids absent values in JSON, so optional elements are inserted only when present.
pub(crate) fn put(resource: &mut Map<String, Value>, name: &str, value: Option<Value>) {
    if let Some(value) = value {
        resource.insert(name.to_owned(), value);
    }
}

pub(crate) fn text_concept(text: String) -> Value {
    json!({ "text": text })
}

#[cfg(test)]
pub(crate) mod testgen {
    //! A tiny deterministic generator for property-style tests; a seeded SplitMix64 keeps
    //! failures reproducible without a test-only dependency.

    use super::{Row, Value};
    use serde_json::json;

    /// Marker placed inside generated "patient data"; error messages must never contain it.
    pub const SECRET: &str = "SECRET-Zoë-李-🩺";

    pub struct Gen(u64);

    impl Gen {
        pub fn new(seed: u64) -> Self {
            Gen(seed)
        }

        pub fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }

        pub fn below(&mut self, n: usize) -> usize {
            if n == 0 {
                0
            } else {
                (self.next_u64() % n as u64) as usize
            }
        }

        pub fn chance(&mut self, percent: usize) -> bool {
            self.below(100) < percent
        }

        pub fn pick(&mut self, items: &[Value]) -> Value {
            items
                .get(self.below(items.len()))
                .cloned()
                .unwrap_or(Value::Null)
        }

        /// Any value a column could plausibly or implausibly hold.
        pub fn chaos(&mut self) -> Value {
            match self.below(12) {
                0 => Value::Null,
                1 => Value::Bool(self.chance(50)),
                2 => json!(self.next_u64() as i64),
                3 => json!(self.next_u64()),
                4 => json!(f64::from_bits(self.next_u64()) % 1e6),
                5 => json!(self.below(1000) as i64 - 100),
                6 => self.pick(&awkward_strings()),
                7 => json!(format!("{SECRET} {}", self.next_u64())),
                8 => json!([SECRET, 1, null]),
                9 => json!({ "x": SECRET }),
                10 => json!(self.digits()),
                _ => {
                    if self.chance(5) {
                        json!(format!("{SECRET}{}", "x".repeat(1_100_000)))
                    } else {
                        json!("")
                    }
                }
            }
        }

        fn digits(&mut self) -> String {
            let len = 1 + self.below(25);
            (0..len)
                .map(|_| char::from(b'0' + (self.below(10) as u8)))
                .collect()
        }

        /// A row where columns mostly hold one of their plausible values, so that generated
        /// rows reach the later fields of a mapper instead of all failing on the first one.
        pub fn row(&mut self, columns: &[(&str, Vec<Value>)]) -> Row {
            let chaos_percent = [0, 5, 15, 50][self.below(4)];
            let mut row = Row::new();
            for (name, plausible) in columns {
                if self.chance(5) {
                    continue;
                }
                let value = if self.chance(chaos_percent) {
                    self.chaos()
                } else {
                    self.pick(plausible)
                };
                row.insert((*name).to_owned(), value);
            }
            row
        }
    }

    pub fn awkward_strings() -> Vec<Value> {
        [
            "",
            "   ",
            "\t\n",
            "infinity",
            "-infinity",
            "NaN",
            "inf",
            "1e999",
            "-0",
            "0044-03-15 BC",
            "10000-01-01",
            "10000-01-01T00:00:00+00:00",
            "2023-02-29",
            "2024-13-01",
            "2024-05-01T25:00:00+00:00",
            "2024-05-01T10:00:00",
            "2024-05-01 10:00:00+00",
            "1900-01-01T00:00:00+00:19:32",
            "0999-12-31",
            "2024-5-1",
            "२०२४-०५-०१",
            "male",
            "F",
            "Ünknown",
            "urn:with space",
            "\u{0}\u{1}",
            "ẞ🩺李",
        ]
        .iter()
        .map(|s| json!(s))
        .collect()
    }

    pub fn dates() -> Vec<Value> {
        [
            "2024-05-01",
            "1000-01-01",
            "1970-01-01",
            "1999-12-31",
            "9999-12-31",
            "infinity",
        ]
        .iter()
        .map(|s| json!(s))
        .collect()
    }

    pub fn timestamps() -> Vec<Value> {
        [
            "2024-05-01T10:00:00+00:00",
            "2024-05-01T10:00:00.123456+02:00",
            "2024-05-01T10:00:00-09:30",
            "9999-12-31T23:59:59.999999+00:00",
            "2024-05-01",
            "1900-01-01T00:00:00+00:19:32",
            "-infinity",
        ]
        .iter()
        .map(|s| json!(s))
        .collect()
    }

    pub fn texts() -> Vec<Value> {
        vec![
            json!(SECRET),
            json!(format!("  {SECRET}  ")),
            json!(format!("{SECRET}\nline two")),
            json!(12345),
            Value::Null,
        ]
    }

    pub fn ints(lo: i64, hi: i64) -> Vec<Value> {
        vec![
            json!(lo),
            json!(hi),
            json!((lo + hi) / 2),
            json!((lo + hi) / 3),
            json!(lo - 1),
            json!(hi + 1),
            json!(120.0),
            json!(" 80 "),
        ]
    }

    pub fn bools() -> Vec<Value> {
        vec![json!(true), json!(false), Value::Null, json!("true")]
    }

    pub fn keys() -> Vec<Value> {
        vec![json!(1), json!(42), json!("a-uuid-like-key"), Value::Null]
    }

    /// Everything FHIR forbids in JSON: nulls, empty strings, empty arrays, empty objects.
    pub fn assert_no_empties(value: &Value, path: &str) {
        match value {
            Value::Null => panic!("null at {path}"),
            Value::String(s) => assert!(!s.trim().is_empty(), "empty string at {path}"),
            Value::Array(items) => {
                assert!(!items.is_empty(), "empty array at {path}");
                for (i, item) in items.iter().enumerate() {
                    assert_no_empties(item, &format!("{path}[{i}]"));
                }
            }
            Value::Object(map) => {
                assert!(!map.is_empty(), "empty object at {path}");
                for (k, v) in map {
                    assert_no_empties(v, &format!("{path}.{k}"));
                }
            }
            Value::Bool(_) | Value::Number(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> Ctx<'static> {
        Ctx {
            table: "public.patient",
            key: "42",
            identifier_base: "urn:fhir-sync",
        }
    }

    #[test]
    fn derived_system_joins_base_and_table() {
        assert_eq!(
            derived_system("urn:fhir-sync", "public.form"),
            "urn:fhir-sync/public.form"
        );
        assert_eq!(
            derived_system("https://example.org/ids/", "public.form"),
            "https://example.org/ids/public.form"
        );
    }

    #[test]
    fn derived_identifier_has_system_and_key() {
        assert_eq!(
            derived_identifier("urn:fhir-sync/", "public.pulse", "7"),
            json!({"system": "urn:fhir-sync/public.pulse", "value": "7"})
        );
        assert_eq!(
            ctx().identifier(),
            json!({"system": "urn:fhir-sync/public.patient", "value": "42"})
        );
    }

    #[test]
    fn display_is_postgres_style() {
        let e = MapError::invalid(
            &ctx(),
            "gender",
            "has an unknown code (expected male, female, other or unknown)",
        );
        assert_eq!(
            e.to_string(),
            "public.patient row 42: field \"gender\" has an unknown code (expected male, female, other or unknown)"
        );
        assert_eq!(e.field(), Some("gender"));
        assert_eq!(e.table(), "public.patient");
        assert_eq!(e.key(), "42");

        let e = MapError::missing(&ctx(), "identifier_value");
        assert_eq!(
            e.to_string(),
            "public.patient row 42: field \"identifier_value\" is required but is missing or null"
        );
        assert_eq!(e.field(), Some("identifier_value"));

        let e = MapError::not_an_object(&ctx());
        assert_eq!(
            e.to_string(),
            "public.patient row 42: the row is not a JSON object"
        );
        assert_eq!(e.field(), None);

        let e = MapError::custom_output(&ctx(), "is empty");
        assert_eq!(
            e.to_string(),
            "public.patient row 42: the map function's result is empty"
        );
        assert_eq!(e.field(), None);
    }

    #[test]
    fn map_error_is_std_error() {
        let e: Box<dyn std::error::Error> = Box::new(MapError::missing(&ctx(), "x"));
        assert!(e.to_string().starts_with("public.patient row 42"));
    }

    #[test]
    fn put_skips_none() {
        let mut m = Map::new();
        put(&mut m, "a", None);
        put(&mut m, "b", Some(json!(1)));
        assert_eq!(Value::Object(m), json!({"b": 1}));
    }
}
