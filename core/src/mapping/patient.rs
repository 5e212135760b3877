//! `patient` (+ `patient_other_identifiers`) -> FHIR R4 Patient.

use super::row::{fhir_date, Fields};
use super::{put, Ctx, MapError, Row};
use chrono::{Days, Utc};
use serde_json::{json, Map, Value};

/// Error-field prefix for columns of the child identifier rows, which are reported under the
/// parent patient row because that is the resource being built.
const OTHER_IDENTIFIERS: &str = "patient_other_identifiers.";

pub fn map(row: &Row, other_identifiers: &[Row], ctx: &Ctx) -> Result<Value, MapError> {
    let f = Fields::new(row, ctx);
    let mut patient = Map::new();
    patient.insert("resourceType".into(), json!("Patient"));
    patient.insert(
        "identifier".into(),
        Value::Array(identifiers(&f, other_identifiers)?),
    );
    put(
        &mut patient,
        "active",
        f.boolean("active")?.map(Value::Bool),
    );
    put(&mut patient, "name", name(&f)?.map(|n| json!([n])));
    put(&mut patient, "telecom", telecom(&f)?);
    put(&mut patient, "gender", gender(&f)?.map(Value::from));
    put(&mut patient, "birthDate", birth_date(&f)?.map(Value::from));
    put(
        &mut patient,
        "deceasedBoolean",
        f.boolean("deceased")?.map(Value::Bool),
    );
    put(&mut patient, "address", address(&f)?.map(|a| json!([a])));
    Ok(Value::Object(patient))
}

/// The primary identifier comes first and is what the sync searches by, so it is required;
/// other identifiers are best effort (a value-less row carries nothing to send).
fn identifiers(f: &Fields, others: &[Row]) -> Result<Vec<Value>, MapError> {
    let system = f.required_uri("identifier_system")?;
    let value = f.required_text("identifier_value")?;
    let mut seen = vec![(Some(system), value)];
    for other in others {
        let child = Fields::child(other, f.ctx(), OTHER_IDENTIFIERS);
        let Some(value) = child.text("identifier_value")? else {
            continue;
        };
        let entry = (child.uri("identifier_system")?, value);
        if !seen.contains(&entry) {
            seen.push(entry);
        }
    }
    Ok(seen
        .into_iter()
        .map(|(system, value)| {
            let mut identifier = Map::new();
            put(&mut identifier, "system", system.map(Value::from));
            identifier.insert("value".into(), Value::from(value));
            Value::Object(identifier)
        })
        .collect())
}

fn name(f: &Fields) -> Result<Option<Value>, MapError> {
    let family = f.text("name_family")?;
    let given: Vec<Value> = f
        .text("name_given")?
        .map(|g| g.split_whitespace().map(Value::from).collect())
        .unwrap_or_default();
    let text = f.text("name_text")?;
    if family.is_none() && given.is_empty() && text.is_none() {
        return Ok(None);
    }
    let mut name = Map::new();
    name.insert("use".into(), json!("official"));
    put(&mut name, "family", family.map(Value::from));
    if !given.is_empty() {
        name.insert("given".into(), Value::Array(given));
    }
    put(&mut name, "text", text.map(Value::from));
    Ok(Some(Value::Object(name)))
}

/// The table does not say whether the number is a home, work or mobile phone, so no `use` is
/// claimed for it.
fn telecom(f: &Fields) -> Result<Option<Value>, MapError> {
    let mut points = Vec::new();
    if let Some(phone) = f.text("phone_number")? {
        points.push(json!({ "system": "phone", "value": phone }));
    }
    if let Some(email) = f.text("email")? {
        points.push(json!({ "system": "email", "value": email }));
    }
    Ok((!points.is_empty()).then_some(Value::Array(points)))
}

fn gender(f: &Fields) -> Result<Option<&'static str>, MapError> {
    let Some(raw) = f.text("gender")? else {
        return Ok(None);
    };
    let code = match raw.to_lowercase().as_str() {
        "male" | "m" => "male",
        "female" | "f" => "female",
        "other" => "other",
        "unknown" => "unknown",
        _ => {
            return Err(f.invalid(
                "gender",
                "has an unknown code (expected male, female, other or unknown)",
            ))
        }
    };
    Ok(Some(code))
}

/// A day of slack because the source may stamp dates in a time zone ahead of UTC.
fn birth_date(f: &Fields) -> Result<Option<String>, MapError> {
    let Some(date) = f.date("birth_date")? else {
        return Ok(None);
    };
    let today = Utc::now().date_naive();
    let latest = today.checked_add_days(Days::new(1)).unwrap_or(today);
    if date > latest {
        return Err(f.invalid("birth_date", "is in the future"));
    }
    Ok(Some(fhir_date(date)))
}

/// A multi-line address column becomes several FHIR lines, which is what `line` is for.
fn address(f: &Fields) -> Result<Option<Value>, MapError> {
    let lines: Vec<Value> = f
        .text("address_line")?
        .map(|l| {
            l.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(Value::from)
                .collect()
        })
        .unwrap_or_default();
    let mut address = Map::new();
    if !lines.is_empty() {
        address.insert("line".into(), Value::Array(lines));
    }
    put(
        &mut address,
        "city",
        f.text("address_city")?.map(Value::from),
    );
    put(
        &mut address,
        "state",
        f.text("address_state")?.map(Value::from),
    );
    put(
        &mut address,
        "postalCode",
        f.text("address_postal_code")?.map(Value::from),
    );
    put(
        &mut address,
        "country",
        f.text("address_country")?.map(Value::from),
    );
    Ok((!address.is_empty()).then_some(Value::Object(address)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapping::testgen::{self, assert_no_empties, Gen, SECRET};

    fn ctx() -> Ctx<'static> {
        Ctx {
            table: "public.patient",
            key: "42",
            identifier_base: "urn:fhir-sync",
        }
    }

    fn row(v: Value) -> Row {
        match v {
            Value::Object(m) => m,
            _ => Row::new(),
        }
    }

    fn sample() -> Row {
        row(json!({
            "id": 42,
            "active": true,
            "birth_date": "1980-02-29",
            "deceased": false,
            "name_family": "Müller",
            "name_given": "  Anna   Maria ",
            "name_text": "Anna Maria Müller",
            "identifier_value": "MRN-0042",
            "identifier_system": "http://hospital.example.org/mrn",
            "phone_number": "+49 30 1234567",
            "email": "anna@example.org",
            "address_line": "Hauptstraße 1\nHinterhaus",
            "address_city": "Berlin",
            "address_state": "BE",
            "address_postal_code": "10115",
            "address_country": "DE",
            "gender": "F",
            "created_at": "2024-05-01T10:00:00+00:00",
            "updated_at": "2024-05-01T10:00:00.123456+00:00"
        }))
    }

    fn other(id: i64, system: Value, value: Value) -> Row {
        row(
            json!({"id": id, "patient_id": 42, "identifier_system": system, "identifier_value": value}),
        )
    }

    fn invalid_field(result: Result<Value, MapError>) -> (String, String) {
        match result {
            Err(MapError::InvalidField { field, reason, .. }) => (field, reason),
            other => panic!("expected InvalidField, got {other:?}"),
        }
    }

    #[test]
    fn sample_row_maps_field_by_field() {
        let others = [
            other(1, json!("urn:oid:1.2.276.0.76.4.8"), json!("X110000001")),
            other(2, json!(null), json!("passport-77")),
        ];
        let p = map(&sample(), &others, &ctx()).unwrap();
        assert_eq!(p["resourceType"], "Patient");
        assert!(p.get("id").is_none(), "the server assigns ids");
        assert_eq!(
            p["identifier"],
            json!([
                {"system": "http://hospital.example.org/mrn", "value": "MRN-0042"},
                {"system": "urn:oid:1.2.276.0.76.4.8", "value": "X110000001"},
                {"value": "passport-77"}
            ])
        );
        assert_eq!(p["active"], true);
        assert_eq!(
            p["name"],
            json!([{
                "use": "official",
                "family": "Müller",
                "given": ["Anna", "Maria"],
                "text": "Anna Maria Müller"
            }])
        );
        assert_eq!(
            p["telecom"],
            json!([
                {"system": "phone", "value": "+49 30 1234567"},
                {"system": "email", "value": "anna@example.org"}
            ])
        );
        assert_eq!(p["gender"], "female");
        assert_eq!(p["birthDate"], "1980-02-29");
        assert_eq!(p["deceasedBoolean"], false);
        assert_eq!(
            p["address"],
            json!([{
                "line": ["Hauptstraße 1", "Hinterhaus"],
                "city": "Berlin",
                "state": "BE",
                "postalCode": "10115",
                "country": "DE"
            }])
        );
        let keys: Vec<&String> = p.as_object().unwrap().keys().collect();
        assert_eq!(
            keys,
            [
                "active",
                "address",
                "birthDate",
                "deceasedBoolean",
                "gender",
                "identifier",
                "name",
                "resourceType",
                "telecom"
            ]
        );
        assert_no_empties(&p, "Patient");
    }

    #[test]
    fn minimal_row_has_only_the_identifier() {
        let r = row(json!({
            "id": 1, "identifier_system": "urn:mrn", "identifier_value": 1001,
            "name_family": null, "name_given": "  ", "name_text": "", "gender": null,
            "phone_number": null, "email": "", "address_line": "\n \n", "address_city": null,
            "active": null, "deceased": null, "birth_date": null
        }));
        let p = map(&r, &[], &ctx()).unwrap();
        assert_eq!(
            p,
            json!({
                "resourceType": "Patient",
                "identifier": [{"system": "urn:mrn", "value": "1001"}]
            })
        );
    }

    #[test]
    fn partial_name_and_telecom() {
        let mut r = sample();
        r.insert("name_family".into(), Value::Null);
        r.insert("name_text".into(), Value::Null);
        r.insert("phone_number".into(), Value::Null);
        r.insert("address_line".into(), Value::Null);
        let p = map(&r, &[], &ctx()).unwrap();
        assert_eq!(
            p["name"],
            json!([{"use": "official", "given": ["Anna", "Maria"]}])
        );
        assert_eq!(
            p["telecom"],
            json!([{"system": "email", "value": "anna@example.org"}])
        );
        assert!(p["address"][0].get("line").is_none());
    }

    #[test]
    fn missing_primary_identifier_is_an_error() {
        for field in ["identifier_system", "identifier_value"] {
            for blank in [Value::Null, json!(""), json!("   ")] {
                let mut r = sample();
                r.insert(field.into(), blank);
                let e = map(&r, &[], &ctx()).unwrap_err();
                assert_eq!(e, MapError::missing(&ctx(), field));
            }
            let mut r = sample();
            r.remove(field);
            assert_eq!(
                map(&r, &[], &ctx()).unwrap_err(),
                MapError::missing(&ctx(), field)
            );
        }
    }

    #[test]
    fn identifier_system_must_be_a_uri() {
        let mut r = sample();
        r.insert("identifier_system".into(), json!("my hospital"));
        let (field, reason) = invalid_field(map(&r, &[], &ctx()));
        assert_eq!(field, "identifier_system");
        assert!(reason.contains("URI"));
    }

    #[test]
    fn other_identifiers_skip_nulls_and_duplicates() {
        let others = [
            other(1, json!("urn:a"), json!(null)),
            other(2, json!("urn:a"), json!("  ")),
            other(
                3,
                json!("http://hospital.example.org/mrn"),
                json!("MRN-0042"),
            ),
            other(4, json!("urn:a"), json!("1")),
            other(5, json!("urn:a"), json!("1")),
            other(6, json!(null), json!("1")),
            other(7, json!(""), json!("1")),
            other(8, json!("urn:b"), json!(7)),
        ];
        let p = map(&sample(), &others, &ctx()).unwrap();
        assert_eq!(
            p["identifier"],
            json!([
                {"system": "http://hospital.example.org/mrn", "value": "MRN-0042"},
                {"system": "urn:a", "value": "1"},
                {"value": "1"},
                {"system": "urn:b", "value": "7"}
            ])
        );
    }

    #[test]
    fn bad_other_identifier_names_the_child_field() {
        let others = [other(1, json!(["urn:x"]), json!("v"))];
        let (field, _) = invalid_field(map(&sample(), &others, &ctx()));
        assert_eq!(field, "patient_other_identifiers.identifier_system");
        let others = [other(1, json!("urn:x"), json!({"v": 1}))];
        let (field, _) = invalid_field(map(&sample(), &others, &ctx()));
        assert_eq!(field, "patient_other_identifiers.identifier_value");
    }

    #[test]
    fn gender_codes() {
        let cases = [
            ("male", "male"),
            ("MALE", "male"),
            (" m ", "male"),
            ("M", "male"),
            ("Female", "female"),
            ("f", "female"),
            ("other", "other"),
            ("Unknown", "unknown"),
        ];
        for (raw, code) in cases {
            let mut r = sample();
            r.insert("gender".into(), json!(raw));
            assert_eq!(map(&r, &[], &ctx()).unwrap()["gender"], code, "{raw}");
        }
    }

    #[test]
    fn unknown_gender_is_an_error_without_the_value() {
        for raw in [json!("x-SECRET"), json!("männlich"), json!("u"), json!(1)] {
            let mut r = sample();
            r.insert("gender".into(), raw);
            let e = map(&r, &[], &ctx()).unwrap_err();
            assert_eq!(e.field(), Some("gender"));
            assert!(!e.to_string().contains("SECRET"));
        }
        let mut r = sample();
        r.insert("gender".into(), json!("x-SECRET"));
        assert_eq!(
            map(&r, &[], &ctx()).unwrap_err().to_string(),
            "public.patient row 42: field \"gender\" has an unknown code (expected male, female, other or unknown)"
        );
    }

    #[test]
    fn birth_date_checks() {
        let tomorrow = Utc::now()
            .date_naive()
            .checked_add_days(Days::new(1))
            .map(fhir_date)
            .unwrap();
        let mut r = sample();
        r.insert("birth_date".into(), json!(tomorrow));
        assert_eq!(map(&r, &[], &ctx()).unwrap()["birthDate"], json!(tomorrow));

        let bad = [
            ("2999-01-01", "is in the future"),
            ("infinity", "is infinite, which FHIR cannot represent"),
            ("-infinity", "is infinite, which FHIR cannot represent"),
            ("10000-01-01", "is out of range (years 1000 to 9999)"),
            ("0044-03-15 BC", "is out of range (years 1000 to 9999)"),
            ("1980-02-30", "is not a real calendar date"),
            ("29.02.1980", "is not a valid date (expected YYYY-MM-DD)"),
        ];
        for (raw, expected) in bad {
            let mut r = sample();
            r.insert("birth_date".into(), json!(raw));
            let (field, reason) = invalid_field(map(&r, &[], &ctx()));
            assert_eq!(
                (field.as_str(), reason.as_str()),
                ("birth_date", expected),
                "{raw}"
            );
        }
    }

    #[test]
    fn wrong_json_types_are_errors() {
        let cases = [
            ("active", json!("yes")),
            ("deceased", json!(0)),
            ("birth_date", json!(19800229)),
            ("name_family", json!(["a"])),
            ("email", json!({"a": 1})),
            ("address_city", json!(true)),
        ];
        for (field, value) in cases {
            let mut r = sample();
            r.insert(field.into(), value);
            let (got, reason) = invalid_field(map(&r, &[], &ctx()));
            assert_eq!(got, field);
            assert!(reason.contains("wrong JSON type"), "{field}: {reason}");
        }
    }

    #[test]
    fn huge_and_unicode_strings() {
        let mut r = sample();
        r.insert("name_text".into(), json!("😀".repeat(300_000)));
        let (field, reason) = invalid_field(map(&r, &[], &ctx()));
        assert_eq!(field, "name_text");
        assert!(reason.contains("1 MiB"));

        let mut r = sample();
        r.insert("name_family".into(), json!("O'Brien-Łukasiewicz 李 ﷽"));
        r.insert("name_given".into(), json!("Zoë\u{3000}Ann")); // ideographic space splits too
        let p = map(&r, &[], &ctx()).unwrap();
        assert_eq!(p["name"][0]["family"], "O'Brien-Łukasiewicz 李 ﷽");
        assert_eq!(p["name"][0]["given"], json!(["Zoë", "Ann"]));
    }

    #[test]
    fn nulls_everywhere() {
        let columns = [
            "id",
            "active",
            "birth_date",
            "deceased",
            "name_family",
            "name_given",
            "name_text",
            "identifier_value",
            "identifier_system",
            "phone_number",
            "email",
            "address_line",
            "address_city",
            "address_state",
            "address_postal_code",
            "address_country",
            "gender",
            "created_at",
            "updated_at",
        ];
        let r: Row = columns
            .iter()
            .map(|c| ((*c).to_owned(), Value::Null))
            .collect();
        assert_eq!(
            map(&r, &[], &ctx()).unwrap_err(),
            MapError::missing(&ctx(), "identifier_system")
        );
        assert!(map(&Row::new(), &[Row::new()], &ctx()).is_err());
    }

    #[test]
    fn arbitrary_rows_never_panic_and_never_leak() {
        let columns = [
            ("id", testgen::keys()),
            ("active", testgen::bools()),
            ("birth_date", testgen::dates()),
            ("deceased", testgen::bools()),
            ("name_family", testgen::texts()),
            ("name_given", testgen::texts()),
            ("name_text", testgen::texts()),
            ("identifier_value", testgen::texts()),
            (
                "identifier_system",
                vec![json!("urn:mrn"), json!("http://x.example/id")],
            ),
            ("phone_number", testgen::texts()),
            ("email", testgen::texts()),
            ("address_line", testgen::texts()),
            ("address_city", testgen::texts()),
            ("address_state", testgen::texts()),
            ("address_postal_code", testgen::texts()),
            ("address_country", testgen::texts()),
            (
                "gender",
                vec![json!("male"), json!("F"), json!("unknown"), json!("other")],
            ),
            ("created_at", testgen::timestamps()),
            ("updated_at", testgen::timestamps()),
        ];
        let child_columns = [
            ("id", testgen::keys()),
            ("patient_id", testgen::keys()),
            (
                "identifier_system",
                vec![json!("urn:a"), json!("urn:b"), Value::Null],
            ),
            ("identifier_value", testgen::texts()),
        ];
        let mut g = Gen::new(0x5EED_0001);
        let (mut ok, mut err) = (0, 0);
        for _ in 0..3000 {
            let r = g.row(&columns);
            let others: Vec<Row> = (0..g.below(4)).map(|_| g.row(&child_columns)).collect();
            match map(&r, &others, &ctx()) {
                Ok(p) => {
                    ok += 1;
                    assert_eq!(p["resourceType"], "Patient");
                    assert!(p["identifier"][0]["system"].is_string());
                    assert_no_empties(&p, "Patient");
                }
                Err(e) => {
                    err += 1;
                    assert!(!e.to_string().contains(SECRET), "{e}");
                    assert!(e.field().is_some(), "{e}");
                }
            }
        }
        assert!(ok > 100 && err > 100, "ok={ok} err={err}");
    }
}
