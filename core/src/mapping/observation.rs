//! `blood_pressure` and `pulse` -> FHIR R4 vital-signs Observations.

use super::row::Fields;
use super::{put, text_concept, Ctx, MapError, Refs, Row};
use serde_json::{json, Map, Value};

const LOINC: &str = "http://loinc.org";
const UCUM: &str = "http://unitsofmeasure.org";
const OBSERVATION_CATEGORY: &str = "http://terminology.hl7.org/CodeSystem/observation-category";
const BODY_POSITION: &str = "http://hl7.org/fhir/StructureDefinition/observation-bodyPosition";

// Plausibility bounds in mmHg. Anything outside them is a unit mix-up or a typing error,
// and a record that looks valid but is wrong is worse than one that is refused.
const SYSTOLIC: (i64, i64) = (1, 400);
const DIASTOLIC: (i64, i64) = (1, 300);

// Beats per minute. 0 stays valid because an absent pulse (arrest) is a real, recordable
// finding; 350 is above the fastest rates seen in practice (infant SVT stays around 300).
const PULSE_RATE: (i64, i64) = (0, 350);

pub fn blood_pressure(row: &Row, ctx: &Ctx, refs: &Refs) -> Result<Value, MapError> {
    let f = Fields::new(row, ctx);
    require_patient(&f)?;
    let systolic = f.required_integer_in("systolic_pressure", SYSTOLIC.0, SYSTOLIC.1, "mmHg")?;
    let diastolic =
        f.required_integer_in("diastolic_pressure", DIASTOLIC.0, DIASTOLIC.1, "mmHg")?;
    if diastolic > systolic {
        return Err(f.invalid("diastolic_pressure", "is higher than systolic_pressure"));
    }
    let effective = f.required_date_time("measurement_time")?;

    let mut obs = vital_sign(
        ctx,
        refs,
        loinc(
            "85354-9",
            "Blood pressure panel with all children optional",
            Some("Blood pressure"),
        ),
    );
    obs.insert("effectiveDateTime".into(), json!(effective));
    obs.insert(
        "component".into(),
        json!([
            quantity_component(
                loinc("8480-6", "Systolic blood pressure", None),
                systolic,
                MM_HG
            ),
            quantity_component(
                loinc("8462-4", "Diastolic blood pressure", None),
                diastolic,
                MM_HG
            ),
        ]),
    );
    put(&mut obs, "bodySite", f.text("location")?.map(text_concept));
    put(
        &mut obs,
        "extension",
        f.text("position")?.map(|position| {
            json!([{ "url": BODY_POSITION, "valueCodeableConcept": text_concept(position) }])
        }),
    );
    put(&mut obs, "note", note(&f)?);
    Ok(Value::Object(obs))
}

/// `measurement_time` is optional here (unlike blood pressure) because the pulse table was
/// specified without it being mandatory; the resource simply has no effective time then.
pub fn pulse(row: &Row, ctx: &Ctx, refs: &Refs) -> Result<Value, MapError> {
    let f = Fields::new(row, ctx);
    require_patient(&f)?;
    let rate = f.required_integer_in("rate", PULSE_RATE.0, PULSE_RATE.1, "/min")?;
    let effective = f.date_time("measurement_time")?;

    let mut obs = vital_sign(ctx, refs, loinc("8867-4", "Heart rate", None));
    put(&mut obs, "effectiveDateTime", effective.map(Value::from));
    obs.insert("valueQuantity".into(), quantity(rate, PER_MINUTE));
    put(&mut obs, "method", f.text("method")?.map(text_concept));
    put(&mut obs, "bodySite", f.text("body_site")?.map(text_concept));
    put(
        &mut obs,
        "component",
        f.text("regularity")?.map(|regularity| {
            json!([{
                "code": text_concept("Pulse regularity".into()),
                "valueString": regularity
            }])
        }),
    );
    put(&mut obs, "note", note(&f)?);
    Ok(Value::Object(obs))
}

/// A vital sign without a patient cannot be attributed to anyone.
fn require_patient(f: &Fields) -> Result<(), MapError> {
    if f.is_present("patient_id") {
        Ok(())
    } else {
        Err(f.missing("patient_id"))
    }
}

/// What every vital-sign Observation carries, whatever was measured.
fn vital_sign(ctx: &Ctx, refs: &Refs, code: Value) -> Map<String, Value> {
    let mut obs = Map::new();
    obs.insert("resourceType".into(), json!("Observation"));
    obs.insert("identifier".into(), json!([ctx.identifier()]));
    // Rows are recorded measurements, not drafts, so they are final when synced.
    obs.insert("status".into(), json!("final"));
    obs.insert(
        "category".into(),
        json!([{
            "coding": [{
                "system": OBSERVATION_CATEGORY,
                "code": "vital-signs",
                "display": "Vital Signs"
            }]
        }]),
    );
    obs.insert("code".into(), code);
    put(&mut obs, "subject", refs.subject.clone());
    put(&mut obs, "encounter", refs.encounter.clone());
    obs
}

fn loinc(code: &str, display: &str, text: Option<&str>) -> Value {
    let mut concept = json!({ "coding": [{ "system": LOINC, "code": code, "display": display }] });
    if let (Some(text), Some(map)) = (text, concept.as_object_mut()) {
        map.insert("text".into(), json!(text));
    }
    concept
}

/// A UCUM unit as (human-readable unit, UCUM code).
type Unit = (&'static str, &'static str);
const MM_HG: Unit = ("mmHg", "mm[Hg]");
const PER_MINUTE: Unit = ("/min", "/min");

fn quantity(value: i64, (unit, code): Unit) -> Value {
    json!({ "value": value, "unit": unit, "system": UCUM, "code": code })
}

fn quantity_component(code: Value, value: i64, unit: Unit) -> Value {
    json!({ "code": code, "valueQuantity": quantity(value, unit) })
}

fn note(f: &Fields) -> Result<Option<Value>, MapError> {
    Ok(f.text("comment")?.map(|text| json!([{ "text": text }])))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapping::testgen::{self, assert_no_empties, Gen, SECRET};

    fn bp_ctx() -> Ctx<'static> {
        Ctx {
            table: "public.blood_pressure",
            key: "11",
            identifier_base: "urn:fhir-sync",
        }
    }

    fn pulse_ctx() -> Ctx<'static> {
        Ctx {
            table: "public.pulse",
            key: "12",
            identifier_base: "urn:fhir-sync/",
        }
    }

    fn refs() -> Refs {
        Refs {
            subject: Some(json!({"reference": "Patient/p1"})),
            encounter: Some(json!({"reference": "Encounter/e1"})),
        }
    }

    fn row(v: Value) -> Row {
        match v {
            Value::Object(m) => m,
            _ => Row::new(),
        }
    }

    fn bp_sample() -> Row {
        row(json!({
            "id": 11, "form_id": 7, "patient_id": 42,
            "systolic_pressure": 128, "diastolic_pressure": 82,
            "measurement_time": "2024-05-01T10:00:00+00:00",
            "position": "sitting", "location": "left arm", "comment": "after 5 min rest",
            "created_at": "2024-05-01T10:00:00+00:00", "updated_at": "2024-05-01T10:00:00+00:00"
        }))
    }

    fn pulse_sample() -> Row {
        row(json!({
            "id": 12, "form_id": 7, "patient_id": 42, "rate": 72,
            "measurement_time": "2024-05-01T10:05:00.5+00:00",
            "regularity": "regular", "method": "palpation", "body_site": "radial artery",
            "comment": "calm", "created_at": null, "updated_at": null
        }))
    }

    fn vital_signs_category() -> Value {
        json!([{
            "coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                "code": "vital-signs",
                "display": "Vital Signs"
            }]
        }])
    }

    fn invalid_field(result: Result<Value, MapError>) -> (String, String) {
        match result {
            Err(MapError::InvalidField { field, reason, .. }) => (field, reason),
            other => panic!("expected InvalidField, got {other:?}"),
        }
    }

    #[test]
    fn blood_pressure_maps_field_by_field() {
        let o = blood_pressure(&bp_sample(), &bp_ctx(), &refs()).unwrap();
        assert_eq!(o["resourceType"], "Observation");
        assert_eq!(o["status"], "final");
        assert_eq!(
            o["identifier"],
            json!([{"system": "urn:fhir-sync/public.blood_pressure", "value": "11"}])
        );
        assert_eq!(o["category"], vital_signs_category());
        assert_eq!(
            o["code"],
            json!({
                "coding": [{
                    "system": "http://loinc.org",
                    "code": "85354-9",
                    "display": "Blood pressure panel with all children optional"
                }],
                "text": "Blood pressure"
            })
        );
        assert_eq!(o["subject"], json!({"reference": "Patient/p1"}));
        assert_eq!(o["encounter"], json!({"reference": "Encounter/e1"}));
        assert_eq!(o["effectiveDateTime"], "2024-05-01T10:00:00+00:00");
        assert_eq!(
            o["component"],
            json!([
                {
                    "code": {"coding": [{"system": "http://loinc.org", "code": "8480-6", "display": "Systolic blood pressure"}]},
                    "valueQuantity": {"value": 128, "unit": "mmHg", "system": "http://unitsofmeasure.org", "code": "mm[Hg]"}
                },
                {
                    "code": {"coding": [{"system": "http://loinc.org", "code": "8462-4", "display": "Diastolic blood pressure"}]},
                    "valueQuantity": {"value": 82, "unit": "mmHg", "system": "http://unitsofmeasure.org", "code": "mm[Hg]"}
                }
            ])
        );
        assert!(
            o.get("valueQuantity").is_none(),
            "a panel carries values only in components"
        );
        assert_eq!(o["bodySite"], json!({"text": "left arm"}));
        assert_eq!(
            o["extension"],
            json!([{
                "url": "http://hl7.org/fhir/StructureDefinition/observation-bodyPosition",
                "valueCodeableConcept": {"text": "sitting"}
            }])
        );
        assert_eq!(o["note"], json!([{"text": "after 5 min rest"}]));
        assert!(o.get("id").is_none());
        assert_eq!(o.as_object().map(|m| m.len()), Some(12));
        assert_no_empties(&o, "Observation");
    }

    #[test]
    fn blood_pressure_minimal() {
        let r = row(json!({
            "id": 11, "patient_id": 42, "systolic_pressure": 120, "diastolic_pressure": 120,
            "measurement_time": "2024-05-01T10:00:00+00:00", "position": " ", "location": null,
            "comment": ""
        }));
        let o = blood_pressure(&r, &bp_ctx(), &Refs::default()).unwrap();
        for absent in ["subject", "encounter", "bodySite", "extension", "note"] {
            assert!(o.get(absent).is_none(), "{absent}");
        }
        assert_eq!(o["component"][1]["valueQuantity"]["value"], 120);
        assert_no_empties(&o, "Observation");
    }

    #[test]
    fn blood_pressure_required_fields() {
        for field in [
            "patient_id",
            "systolic_pressure",
            "diastolic_pressure",
            "measurement_time",
        ] {
            let mut r = bp_sample();
            r.insert(field.into(), Value::Null);
            assert_eq!(
                blood_pressure(&r, &bp_ctx(), &refs()).unwrap_err(),
                MapError::missing(&bp_ctx(), field),
                "{field}"
            );
            r.remove(field);
            assert_eq!(
                blood_pressure(&r, &bp_ctx(), &refs()).unwrap_err(),
                MapError::missing(&bp_ctx(), field),
                "{field}"
            );
        }
    }

    #[test]
    fn blood_pressure_ranges() {
        let ok = [(1, 1), (400, 300), (400, 1), (120, 120)];
        for (s, d) in ok {
            let mut r = bp_sample();
            r.insert("systolic_pressure".into(), json!(s));
            r.insert("diastolic_pressure".into(), json!(d));
            assert!(blood_pressure(&r, &bp_ctx(), &refs()).is_ok(), "{s}/{d}");
        }
        let bad = [
            (
                0,
                80,
                "systolic_pressure",
                "is out of range (1 to 400 mmHg)",
            ),
            (
                401,
                80,
                "systolic_pressure",
                "is out of range (1 to 400 mmHg)",
            ),
            (
                -120,
                80,
                "systolic_pressure",
                "is out of range (1 to 400 mmHg)",
            ),
            (
                120,
                0,
                "diastolic_pressure",
                "is out of range (1 to 300 mmHg)",
            ),
            (
                400,
                301,
                "diastolic_pressure",
                "is out of range (1 to 300 mmHg)",
            ),
            (
                80,
                120,
                "diastolic_pressure",
                "is higher than systolic_pressure",
            ),
        ];
        for (s, d, field, reason) in bad {
            let mut r = bp_sample();
            r.insert("systolic_pressure".into(), json!(s));
            r.insert("diastolic_pressure".into(), json!(d));
            let got = invalid_field(blood_pressure(&r, &bp_ctx(), &refs()));
            assert_eq!((got.0.as_str(), got.1.as_str()), (field, reason), "{s}/{d}");
        }
        let mut r = bp_sample();
        r.insert("systolic_pressure".into(), json!(401));
        assert_eq!(
            blood_pressure(&r, &bp_ctx(), &refs()).unwrap_err().to_string(),
            "public.blood_pressure row 11: field \"systolic_pressure\" is out of range (1 to 400 mmHg)"
        );
    }

    #[test]
    fn blood_pressure_bad_types_and_dates() {
        let cases = [
            ("systolic_pressure", json!("high")),
            ("systolic_pressure", json!(120.5)),
            ("systolic_pressure", json!(u64::MAX)),
            ("diastolic_pressure", json!(true)),
            ("measurement_time", json!("infinity")),
            ("measurement_time", json!("-infinity")),
            ("measurement_time", json!("10000-01-01T00:00:00+00:00")),
            ("measurement_time", json!("2024-05-01T10:00:00")),
            ("measurement_time", json!(1714557600)),
            ("location", json!(["arm"])),
            ("position", json!(false)),
            ("comment", json!("x".repeat(1024 * 1024 + 1))),
        ];
        for (field, value) in cases {
            let mut r = bp_sample();
            r.insert(field.into(), value);
            let (got, _) = invalid_field(blood_pressure(&r, &bp_ctx(), &refs()));
            assert_eq!(got, field);
        }
        let mut r = bp_sample();
        r.insert("systolic_pressure".into(), json!("130"));
        r.insert("diastolic_pressure".into(), json!(85.0));
        let o = blood_pressure(&r, &bp_ctx(), &refs()).unwrap();
        assert_eq!(o["component"][0]["valueQuantity"]["value"], 130);
        assert_eq!(o["component"][1]["valueQuantity"]["value"], 85);
    }

    #[test]
    fn pulse_maps_field_by_field() {
        let o = pulse(&pulse_sample(), &pulse_ctx(), &refs()).unwrap();
        assert_eq!(o["resourceType"], "Observation");
        assert_eq!(o["status"], "final");
        assert_eq!(
            o["identifier"],
            json!([{"system": "urn:fhir-sync/public.pulse", "value": "12"}])
        );
        assert_eq!(o["category"], vital_signs_category());
        assert_eq!(
            o["code"],
            json!({"coding": [{"system": "http://loinc.org", "code": "8867-4", "display": "Heart rate"}]})
        );
        assert_eq!(o["subject"], json!({"reference": "Patient/p1"}));
        assert_eq!(o["encounter"], json!({"reference": "Encounter/e1"}));
        assert_eq!(o["effectiveDateTime"], "2024-05-01T10:05:00.500+00:00");
        assert_eq!(
            o["valueQuantity"],
            json!({"value": 72, "unit": "/min", "system": "http://unitsofmeasure.org", "code": "/min"})
        );
        assert_eq!(o["method"], json!({"text": "palpation"}));
        assert_eq!(o["bodySite"], json!({"text": "radial artery"}));
        assert_eq!(
            o["component"],
            json!([{"code": {"text": "Pulse regularity"}, "valueString": "regular"}])
        );
        assert_eq!(o["note"], json!([{"text": "calm"}]));
        assert_eq!(o.as_object().map(|m| m.len()), Some(13));
        assert_no_empties(&o, "Observation");
    }

    #[test]
    fn pulse_minimal_and_bounds() {
        let r = row(json!({"id": 12, "patient_id": "p-uuid", "rate": 0}));
        let o = pulse(&r, &pulse_ctx(), &Refs::default()).unwrap();
        assert_eq!(o["valueQuantity"]["value"], 0);
        for absent in [
            "subject",
            "encounter",
            "effectiveDateTime",
            "method",
            "bodySite",
            "component",
            "note",
        ] {
            assert!(o.get(absent).is_none(), "{absent}");
        }
        assert_no_empties(&o, "Observation");

        for (rate, ok) in [(350, true), (351, false), (-1, false), (i64::MAX, false)] {
            let mut r = pulse_sample();
            r.insert("rate".into(), json!(rate));
            let result = pulse(&r, &pulse_ctx(), &refs());
            assert_eq!(result.is_ok(), ok, "{rate}");
            if let Err(e) = result {
                assert_eq!(
                    e.to_string(),
                    "public.pulse row 12: field \"rate\" is out of range (0 to 350 /min)"
                );
            }
        }
    }

    #[test]
    fn pulse_required_fields() {
        for field in ["patient_id", "rate"] {
            let mut r = pulse_sample();
            r.insert(field.into(), Value::Null);
            assert_eq!(
                pulse(&r, &pulse_ctx(), &refs()).unwrap_err(),
                MapError::missing(&pulse_ctx(), field)
            );
        }
        let mut r = pulse_sample();
        r.insert("measurement_time".into(), json!("infinity"));
        let (field, reason) = invalid_field(pulse(&r, &pulse_ctx(), &refs()));
        assert_eq!(field, "measurement_time");
        assert!(reason.contains("infinite"));
    }

    #[test]
    fn unicode_free_text() {
        let mut r = pulse_sample();
        r.insert(
            "comment".into(),
            json!("Patient ängstlich 😰\nzweite Zeile"),
        );
        r.insert("regularity".into(), json!("不规则"));
        let o = pulse(&r, &pulse_ctx(), &refs()).unwrap();
        assert_eq!(o["note"][0]["text"], "Patient ängstlich 😰\nzweite Zeile");
        assert_eq!(o["component"][0]["valueString"], "不规则");
    }

    #[test]
    fn not_an_object_rows_are_empty_rows() {
        assert_eq!(
            blood_pressure(&Row::new(), &bp_ctx(), &refs()).unwrap_err(),
            MapError::missing(&bp_ctx(), "patient_id")
        );
    }

    #[test]
    fn arbitrary_rows_never_panic_and_never_leak() {
        let bp_columns = [
            ("id", testgen::keys()),
            ("form_id", testgen::keys()),
            ("patient_id", testgen::keys()),
            ("systolic_pressure", testgen::ints(1, 400)),
            ("diastolic_pressure", testgen::ints(1, 300)),
            ("measurement_time", testgen::timestamps()),
            ("position", testgen::texts()),
            ("location", testgen::texts()),
            ("comment", testgen::texts()),
            ("created_at", testgen::timestamps()),
            ("updated_at", testgen::timestamps()),
        ];
        let pulse_columns = [
            ("id", testgen::keys()),
            ("form_id", testgen::keys()),
            ("patient_id", testgen::keys()),
            ("rate", testgen::ints(0, 350)),
            ("measurement_time", testgen::timestamps()),
            ("regularity", testgen::texts()),
            ("method", testgen::texts()),
            ("body_site", testgen::texts()),
            ("comment", testgen::texts()),
            ("created_at", testgen::timestamps()),
            ("updated_at", testgen::timestamps()),
        ];
        let mut g = Gen::new(0x5EED_0003);
        let (mut ok, mut err) = (0, 0);
        for i in 0..6000 {
            let refs = if i % 3 == 0 { Refs::default() } else { refs() };
            let result = if i % 2 == 0 {
                blood_pressure(&g.row(&bp_columns), &bp_ctx(), &refs)
            } else {
                pulse(&g.row(&pulse_columns), &pulse_ctx(), &refs)
            };
            match result {
                Ok(o) => {
                    ok += 1;
                    assert_eq!(o["resourceType"], "Observation");
                    assert_no_empties(&o, "Observation");
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
