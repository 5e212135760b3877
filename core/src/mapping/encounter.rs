//! `form` -> FHIR R4 Encounter: a filled-in form is one ambulatory visit.

use super::row::Fields;
use super::{put, text_concept, Ctx, MapError, Refs, Row};
use serde_json::{json, Map, Value};

const ACT_CODE_SYSTEM: &str = "http://terminology.hl7.org/CodeSystem/v3-ActCode";

pub fn map(row: &Row, ctx: &Ctx, refs: &Refs) -> Result<Value, MapError> {
    let f = Fields::new(row, ctx);
    // A form without a patient would become an encounter nobody can find or attribute.
    if !f.is_present("patient_id") {
        return Err(f.missing("patient_id"));
    }
    let mut encounter = Map::new();
    encounter.insert("resourceType".into(), json!("Encounter"));
    encounter.insert("identifier".into(), json!([ctx.identifier()]));
    // Forms are entered after the visit, so the visit is over by the time it is synced.
    encounter.insert("status".into(), json!("finished"));
    encounter.insert(
        "class".into(),
        json!({ "system": ACT_CODE_SYSTEM, "code": "AMB", "display": "ambulatory" }),
    );
    put(
        &mut encounter,
        "type",
        f.text("name")?.map(|name| json!([text_concept(name)])),
    );
    put(&mut encounter, "subject", refs.subject.clone());
    put(
        &mut encounter,
        "period",
        f.date_time("encounter_date")?
            .map(|start| json!({ "start": start })),
    );
    Ok(Value::Object(encounter))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapping::testgen::{self, assert_no_empties, Gen, SECRET};

    fn ctx() -> Ctx<'static> {
        Ctx {
            table: "public.form",
            key: "7",
            identifier_base: "urn:fhir-sync",
        }
    }

    fn refs() -> Refs {
        Refs {
            subject: Some(json!({"reference": "Patient/123"})),
            encounter: None,
        }
    }

    fn sample() -> Row {
        match json!({
            "id": 7,
            "patient_id": 42,
            "name": "Cardiology follow-up",
            "encounter_date": "2024-05-01T10:00:00.250+02:00",
            "created_at": "2024-05-01T10:00:00+00:00",
            "updated_at": "2024-05-01T10:00:00+00:00"
        }) {
            Value::Object(m) => m,
            _ => Row::new(),
        }
    }

    #[test]
    fn sample_row_maps_field_by_field() {
        let e = map(&sample(), &ctx(), &refs()).unwrap();
        assert_eq!(e["resourceType"], "Encounter");
        assert_eq!(
            e["identifier"],
            json!([{"system": "urn:fhir-sync/public.form", "value": "7"}])
        );
        assert_eq!(e["status"], "finished");
        assert_eq!(
            e["class"],
            json!({
                "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                "code": "AMB",
                "display": "ambulatory"
            })
        );
        assert!(
            e["class"].is_object(),
            "R4 Encounter.class is a single Coding"
        );
        assert_eq!(e["type"], json!([{"text": "Cardiology follow-up"}]));
        assert_eq!(e["subject"], json!({"reference": "Patient/123"}));
        assert_eq!(
            e["period"],
            json!({"start": "2024-05-01T10:00:00.250+02:00"})
        );
        assert!(e.get("id").is_none());
        assert_eq!(e.as_object().map(|m| m.len()), Some(7));
        assert_no_empties(&e, "Encounter");
    }

    #[test]
    fn optional_fields_are_omitted() {
        let mut r = sample();
        r.insert("name".into(), json!("  "));
        r.remove("encounter_date");
        let e = map(&r, &ctx(), &Refs::default()).unwrap();
        assert!(e.get("type").is_none());
        assert!(e.get("period").is_none());
        assert!(e.get("subject").is_none(), "unresolved subject is left out");
        assert_no_empties(&e, "Encounter");
    }

    #[test]
    fn patient_id_is_required() {
        for bad in [Value::Null, json!(""), json!(" ")] {
            let mut r = sample();
            r.insert("patient_id".into(), bad);
            assert_eq!(
                map(&r, &ctx(), &refs()).unwrap_err(),
                MapError::missing(&ctx(), "patient_id")
            );
        }
        let mut r = sample();
        r.remove("patient_id");
        assert_eq!(
            map(&r, &ctx(), &refs()).unwrap_err().to_string(),
            "public.form row 7: field \"patient_id\" is required but is missing or null"
        );
    }

    #[test]
    fn bad_encounter_dates() {
        for bad in [
            "infinity",
            "-infinity",
            "10000-01-01T00:00:00+00:00",
            "2024-05-01T10:00:00",
            "yesterday",
        ] {
            let mut r = sample();
            r.insert("encounter_date".into(), json!(bad));
            let err = map(&r, &ctx(), &refs()).unwrap_err();
            assert_eq!(err.field(), Some("encounter_date"), "{bad}");
        }
        let mut r = sample();
        r.insert("encounter_date".into(), json!("2024-05-01"));
        assert_eq!(
            map(&r, &ctx(), &refs()).unwrap()["period"]["start"],
            "2024-05-01"
        );
    }

    #[test]
    fn wrong_types_and_unicode() {
        let mut r = sample();
        r.insert("name".into(), json!({"x": 1}));
        assert_eq!(map(&r, &ctx(), &refs()).unwrap_err().field(), Some("name"));
        let mut r = sample();
        r.insert("name".into(), json!("Кардиология 🫀"));
        assert_eq!(
            map(&r, &ctx(), &refs()).unwrap()["type"][0]["text"],
            "Кардиология 🫀"
        );
    }

    #[test]
    fn arbitrary_rows_never_panic_and_never_leak() {
        let columns = [
            ("id", testgen::keys()),
            ("patient_id", testgen::keys()),
            ("name", testgen::texts()),
            ("encounter_date", testgen::timestamps()),
            ("created_at", testgen::timestamps()),
            ("updated_at", testgen::timestamps()),
        ];
        let mut g = Gen::new(0x5EED_0002);
        let (mut ok, mut err) = (0, 0);
        for i in 0..3000 {
            let r = g.row(&columns);
            let refs = if i % 2 == 0 { refs() } else { Refs::default() };
            match map(&r, &ctx(), &refs) {
                Ok(e) => {
                    ok += 1;
                    assert_eq!(e["identifier"][0]["value"], "7");
                    assert_no_empties(&e, "Encounter");
                }
                Err(e) => {
                    err += 1;
                    assert!(!e.to_string().contains(SECRET), "{e}");
                }
            }
        }
        assert!(ok > 100 && err > 100, "ok={ok} err={err}");
    }
}
