//! Final checks on a resource built by a user's SQL map function.
//!
//! The function owns the clinical content; this module only enforces what the sync itself
//! relies on (the resource type and the sync identifier) and removes what a strict server
//! would refuse outright (nulls and empty values, which `jsonb_build_object` produces for
//! every NULL column).

use super::{json_type, Ctx, MapError};
use serde_json::{Map, Value};

/// R4 resources whose `identifier` is 0..1 and therefore a single object, not an array.
const SINGLE_IDENTIFIER_TYPES: [&str; 3] = ["Bundle", "Composition", "QuestionnaireResponse"];

/// Real resources nest a dozen levels at most; the limit keeps the recursion bounded for
/// any input, since a stack overflow would take the backend down.
const MAX_DEPTH: usize = 100;

pub fn finish(
    value: Value,
    resource_type: &str,
    identifier: Value,
    ctx: &Ctx,
) -> Result<Value, MapError> {
    let mut resource = match value {
        Value::Object(map) => map,
        Value::Null => return Err(MapError::custom_output(ctx, "is null")),
        other => {
            return Err(MapError::custom_output(
                ctx,
                format!("is a JSON {} instead of an object", json_type(&other)),
            ))
        }
    };
    // The server owns these; sending ours would make it reject the write or clobber its own.
    resource.remove("id");
    resource.remove("meta");
    prune_object(&mut resource, 0, ctx)?;
    check_resource_type(&mut resource, resource_type, ctx)?;
    if resource.len() <= 1 {
        return Err(MapError::custom_output(ctx, "is empty"));
    }
    add_identifier(&mut resource, identifier, resource_type, ctx)?;
    Ok(Value::Object(resource))
}

fn check_resource_type(
    resource: &mut Map<String, Value>,
    expected: &str,
    ctx: &Ctx,
) -> Result<(), MapError> {
    match resource.get("resourceType") {
        None => {
            resource.insert("resourceType".into(), Value::from(expected));
            Ok(())
        }
        Some(Value::String(found)) if found == expected => Ok(()),
        Some(Value::String(found)) if looks_like_type_name(found) => Err(MapError::custom_output(
            ctx,
            format!("has resourceType \"{found}\" but the table is tracked as \"{expected}\""),
        )),
        Some(Value::String(_)) => Err(MapError::custom_output(
            ctx,
            format!("has a resourceType other than \"{expected}\", which the table is tracked as"),
        )),
        Some(other) => Err(MapError::custom_output(
            ctx,
            format!(
                "has a resourceType that is a JSON {}, not a string",
                json_type(other)
            ),
        )),
    }
}

/// Only a plausible resource type name is echoed: anything else might be data.
fn looks_like_type_name(s: &str) -> bool {
    s.len() <= 64
        && s.starts_with(|c: char| c.is_ascii_uppercase())
        && s.chars().all(|c| c.is_ascii_alphabetic())
}

/// The sync finds the resource on the server again by this identifier, so it must be there.
fn add_identifier(
    resource: &mut Map<String, Value>,
    ours: Value,
    resource_type: &str,
    ctx: &Ctx,
) -> Result<(), MapError> {
    let single = SINGLE_IDENTIFIER_TYPES.contains(&resource_type);
    let existing: Vec<Value> = match resource.remove("identifier") {
        None => Vec::new(),
        Some(Value::Array(list)) => list,
        Some(Value::Object(one)) => vec![Value::Object(one)],
        Some(other) => {
            return Err(MapError::custom_output(
                ctx,
                format!("has an identifier that is a JSON {}", json_type(&other)),
            ))
        }
    };
    let value = if single {
        if existing.iter().any(|id| !same_identifier(id, &ours)) {
            return Err(MapError::custom_output(
                ctx,
                format!(
                    "has an identifier of its own, but a {resource_type} holds only one and the sync needs it"
                ),
            ));
        }
        ours
    } else {
        let mut list = existing;
        if !list.iter().any(|id| same_identifier(id, &ours)) {
            list.push(ours);
        }
        Value::Array(list)
    };
    resource.insert("identifier".into(), value);
    Ok(())
}

fn same_identifier(a: &Value, b: &Value) -> bool {
    a.get("system") == b.get("system") && a.get("value") == b.get("value")
}

fn too_deep(ctx: &Ctx) -> MapError {
    MapError::custom_output(
        ctx,
        format!("is nested too deeply (more than {MAX_DEPTH} levels)"),
    )
}

/// Removes nulls, blank strings, empty arrays and empty objects, bottom up, since FHIR JSON
/// allows none of them. Arrays paired with a `_name` sibling (primitive extensions) keep
/// their positions, because FHIR aligns the two arrays by index and uses null as padding.
fn prune_object(map: &mut Map<String, Value>, depth: usize, ctx: &Ctx) -> Result<(), MapError> {
    if depth > MAX_DEPTH {
        return Err(too_deep(ctx));
    }
    let paired: Vec<String> = map
        .keys()
        .filter(|k| has_partner(map, k))
        .cloned()
        .collect();
    for (name, value) in map.iter_mut() {
        prune_value(value, depth + 1, paired.contains(name), ctx)?;
    }
    map.retain(|_, value| !is_empty(value));
    // A partner pruned away leaves its sibling's null padding meaningless (and invalid).
    let orphans: Vec<&String> = paired
        .iter()
        .filter(|name| !has_partner(map, name))
        .collect();
    for name in orphans {
        if let Some(Value::Array(items)) = map.get_mut(name) {
            items.retain(|item| !item.is_null());
            if items.is_empty() {
                map.remove(name);
            }
        }
    }
    Ok(())
}

fn prune_value(
    value: &mut Value,
    depth: usize,
    keep_positions: bool,
    ctx: &Ctx,
) -> Result<(), MapError> {
    if depth > MAX_DEPTH {
        return Err(too_deep(ctx));
    }
    match value {
        Value::Object(map) => prune_object(map, depth, ctx),
        Value::Array(items) => {
            for item in items.iter_mut() {
                prune_value(item, depth + 1, false, ctx)?;
            }
            if keep_positions {
                for item in items.iter_mut() {
                    if is_empty(item) {
                        *item = Value::Null;
                    }
                }
                if items.iter().all(Value::is_null) {
                    items.clear();
                }
            } else {
                items.retain(|item| !is_empty(item));
            }
            Ok(())
        }
        Value::Null | Value::Bool(_) | Value::Number(_) | Value::String(_) => Ok(()),
    }
}

fn has_partner(map: &Map<String, Value>, name: &str) -> bool {
    match name.strip_prefix('_') {
        Some(base) => map.contains_key(base),
        None => map.contains_key(&format!("_{name}")),
    }
}

fn is_empty(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::String(s) => s.trim().is_empty(),
        Value::Array(items) => items.is_empty(),
        Value::Object(map) => map.is_empty(),
        Value::Bool(_) | Value::Number(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapping::testgen::{assert_no_empties, Gen, SECRET};
    use serde_json::json;

    fn ctx() -> Ctx<'static> {
        Ctx {
            table: "public.vitals",
            key: "5",
            identifier_base: "urn:fhir-sync",
        }
    }

    fn ours() -> Value {
        ctx().identifier()
    }

    fn reason(result: Result<Value, MapError>) -> String {
        match result {
            Err(MapError::InvalidCustomOutput { reason, .. }) => reason,
            other => panic!("expected InvalidCustomOutput, got {other:?}"),
        }
    }

    #[test]
    fn complete_resource_gets_our_identifier_and_loses_server_fields() {
        let input = json!({
            "resourceType": "Observation",
            "id": "abc",
            "meta": {"versionId": "3", "lastUpdated": "2024-05-01T10:00:00Z"},
            "status": "final",
            "code": {"text": "Body weight"},
            "valueQuantity": {"value": 72.5, "unit": "kg", "system": "http://unitsofmeasure.org", "code": "kg"},
            "identifier": [{"system": "urn:lab", "value": "L-1"}]
        });
        let out = finish(input, "Observation", ours(), &ctx()).unwrap();
        assert_eq!(
            out,
            json!({
                "resourceType": "Observation",
                "status": "final",
                "code": {"text": "Body weight"},
                "valueQuantity": {"value": 72.5, "unit": "kg", "system": "http://unitsofmeasure.org", "code": "kg"},
                "identifier": [
                    {"system": "urn:lab", "value": "L-1"},
                    {"system": "urn:fhir-sync/public.vitals", "value": "5"}
                ]
            })
        );
    }

    #[test]
    fn resource_type_is_inserted_when_absent() {
        let out = finish(json!({"status": "final"}), "Observation", ours(), &ctx()).unwrap();
        assert_eq!(out["resourceType"], "Observation");
        assert_eq!(out["identifier"], json!([ours()]));
    }

    #[test]
    fn resource_type_mismatch() {
        let r = reason(finish(
            json!({"resourceType": "Patient", "active": true}),
            "Observation",
            ours(),
            &ctx(),
        ));
        assert_eq!(
            r,
            "has resourceType \"Patient\" but the table is tracked as \"Observation\""
        );
        let r = reason(finish(
            json!({"resourceType": "John Smith SECRET", "active": true}),
            "Observation",
            ours(),
            &ctx(),
        ));
        assert!(!r.contains("SECRET"));
        let r = reason(finish(
            json!({"resourceType": 7, "active": true}),
            "Observation",
            ours(),
            &ctx(),
        ));
        assert!(r.contains("JSON number"));
    }

    #[test]
    fn identifier_already_present_is_not_duplicated() {
        let input = json!({"status": "final", "identifier": [ours()]});
        let out = finish(input, "Observation", ours(), &ctx()).unwrap();
        assert_eq!(out["identifier"], json!([ours()]));
        let input = json!({"status": "final", "identifier": ours()});
        let out = finish(input, "Observation", ours(), &ctx()).unwrap();
        assert_eq!(
            out["identifier"],
            json!([ours()]),
            "a lone object becomes an array"
        );
    }

    #[test]
    fn single_identifier_types() {
        let out = finish(
            json!({"status": "completed"}),
            "QuestionnaireResponse",
            ours(),
            &ctx(),
        )
        .unwrap();
        assert_eq!(out["identifier"], ours());
        let out = finish(
            json!({"status": "completed", "identifier": ours()}),
            "QuestionnaireResponse",
            ours(),
            &ctx(),
        )
        .unwrap();
        assert_eq!(out["identifier"], ours());
        let r = reason(finish(
            json!({"status": "completed", "identifier": {"system": "urn:x", "value": "1"}}),
            "QuestionnaireResponse",
            ours(),
            &ctx(),
        ));
        assert!(r.contains("holds only one"));
    }

    #[test]
    fn bad_identifier_shape() {
        let r = reason(finish(
            json!({"status": "final", "identifier": "urn:x|1"}),
            "Observation",
            ours(),
            &ctx(),
        ));
        assert_eq!(r, "has an identifier that is a JSON string");
    }

    #[test]
    fn non_objects_and_empty_results() {
        let cases = [
            (json!(null), "is null"),
            (json!([]), "is a JSON array instead of an object"),
            (json!("Patient"), "is a JSON string instead of an object"),
            (json!(3), "is a JSON number instead of an object"),
            (json!({}), "is empty"),
            (json!({"resourceType": "Observation"}), "is empty"),
            (json!({"id": "1", "meta": {"versionId": "1"}}), "is empty"),
            (
                json!({"status": null, "code": {"text": " "}, "note": [{}]}),
                "is empty",
            ),
        ];
        for (input, expected) in cases {
            assert_eq!(
                reason(finish(input.clone(), "Observation", ours(), &ctx())),
                expected,
                "{input}"
            );
        }
        assert_eq!(
            finish(json!(null), "Observation", ours(), &ctx())
                .unwrap_err()
                .to_string(),
            "public.vitals row 5: the map function's result is null"
        );
    }

    #[test]
    fn nulls_and_empties_are_pruned() {
        let input = json!({
            "status": "final",
            "subject": null,
            "note": [{"text": ""}, {"text": "ok"}, null],
            "code": {"coding": [{"system": "http://loinc.org", "code": "29463-7", "display": null}], "text": "  "},
            "component": [],
            "extension": [{"url": "http://x", "valueString": null}],
            "valueBoolean": false,
            "valueInteger": 0
        });
        let out = finish(input, "Observation", ours(), &ctx()).unwrap();
        assert_eq!(
            out,
            json!({
                "resourceType": "Observation",
                "status": "final",
                "note": [{"text": "ok"}],
                "code": {"coding": [{"system": "http://loinc.org", "code": "29463-7"}]},
                "extension": [{"url": "http://x"}],
                "valueBoolean": false,
                "valueInteger": 0,
                "identifier": [ours()]
            })
        );
    }

    #[test]
    fn primitive_extension_arrays_keep_their_positions() {
        let input = json!({
            "name": [{
                "given": ["Ann", null, ""],
                "_given": [null, {"extension": [{"url": "http://x", "valueString": "y"}]}, null]
            }]
        });
        let out = finish(input, "Patient", ours(), &ctx()).unwrap();
        assert_eq!(out["name"][0]["given"], json!(["Ann", null, null]));
        assert_eq!(
            out["name"][0]["_given"][1]["extension"][0]["url"],
            "http://x"
        );
        assert_eq!(out["name"][0]["_given"][0], Value::Null);
    }

    #[test]
    fn deep_nesting_is_refused_not_overflowed() {
        let mut deep = json!("leaf");
        for _ in 0..(MAX_DEPTH + 10) {
            deep = json!({ "a": [deep] });
        }
        let r = reason(finish(
            json!({"status": "final", "x": deep}),
            "Basic",
            ours(),
            &ctx(),
        ));
        assert!(r.contains("nested too deeply"));

        let mut ok = json!("leaf");
        for _ in 0..20 {
            ok = json!({ "a": [ok] });
        }
        assert!(finish(json!({"x": ok}), "Basic", ours(), &ctx()).is_ok());
    }

    #[test]
    fn unicode_and_huge_content_pass_through() {
        let text = format!("{} {}", "李🩺".repeat(10), "x".repeat(2 * 1024 * 1024));
        let out = finish(
            json!({"note": [{"text": text.clone()}]}),
            "Observation",
            ours(),
            &ctx(),
        )
        .unwrap();
        assert_eq!(out["note"][0]["text"], json!(text));
    }

    fn arbitrary(g: &mut Gen, depth: usize) -> Value {
        if depth > 4 {
            return g.chaos();
        }
        match g.below(6) {
            0 => Value::Array((0..g.below(4)).map(|_| arbitrary(g, depth + 1)).collect()),
            1 | 2 => {
                let names = [
                    "resourceType",
                    "id",
                    "meta",
                    "identifier",
                    "status",
                    "_status",
                    "text",
                    "given",
                    "_given",
                ];
                let mut map = Map::new();
                for _ in 0..g.below(5) {
                    let name = names[g.below(names.len())];
                    map.insert(name.into(), arbitrary(g, depth + 1));
                }
                Value::Object(map)
            }
            3 => g.pick(&[json!("Observation"), json!("Patient"), json!(SECRET)]),
            _ => g.chaos(),
        }
    }

    #[test]
    fn arbitrary_output_never_panics_and_never_leaks() {
        let mut g = Gen::new(0x5EED_0004);
        let types = ["Observation", "Patient", "QuestionnaireResponse"];
        let (mut ok, mut err) = (0, 0);
        for i in 0..5000 {
            let value = arbitrary(&mut g, 0);
            let resource_type = types[i % types.len()];
            match finish(value, resource_type, ours(), &ctx()) {
                Ok(out) => {
                    ok += 1;
                    assert_eq!(out["resourceType"], resource_type);
                    assert!(out.get("id").is_none() && out.get("meta").is_none());
                    let ids = &out["identifier"];
                    let has_ours =
                        *ids == ours() || ids.as_array().is_some_and(|l| l.contains(&ours()));
                    assert!(has_ours, "{out}");
                    // `_x` arrays may legitimately keep null padding, so check the rest.
                    if !out.to_string().contains("\"_") {
                        assert_no_empties(&out, resource_type);
                    }
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
