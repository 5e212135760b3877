//! What the server says it can do (its CapabilityStatement, `GET [base]/metadata`) and what the
//! worker makes of it: a conditional create where the server takes no update-as-create, no
//! If-Match where it does not honour versions, single requests where it takes no Bundle, and
//! no request at all for a write it declares it does not take. Only what the statement says
//! explicitly changes anything: an absent field is "unknown", and the settings stand.

use crate::send::{BundleType, WriteMode};
use serde_json::{json, Value};
use std::collections::HashMap;

/// One resource type's entry of the CapabilityStatement; None: not stated.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TypeCaps {
    /// The interaction codes listed (`create`, `update`, `delete`, …); None when none are.
    pub interactions: Option<Vec<String>>,
    pub conditional_create: Option<bool>,
    pub conditional_update: Option<bool>,
    pub update_create: Option<bool>,
    /// `no-version`, `versioned` or `versioned-update` (the last honours If-Match).
    pub versioning: Option<String>,
}

impl TypeCaps {
    fn has(&self, code: &str) -> Option<bool> {
        self.interactions
            .as_ref()
            .map(|i| i.iter().any(|c| c == code))
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Capabilities {
    pub fhir_version: Option<String>,
    pub software: Option<String>,
    /// System interactions `batch` / `transaction`; None when the statement lists none.
    pub batch: Option<bool>,
    pub transaction: Option<bool>,
    pub types: HashMap<String, TypeCaps>,
}

/// What the worker does for a resource type, given the settings and the statement.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub write_mode: WriteMode,
    /// Whether updates by id carry If-Match.
    pub if_match: bool,
    /// Whether a DELETE is sent (false: the server declares no delete).
    pub delete: bool,
    /// Why anything differs from the settings, for the log and `fhir_sync_server`.
    pub notes: Vec<String>,
}

fn bool_at(v: &Value, key: &str) -> Option<bool> {
    v.get(key).and_then(Value::as_bool)
}

/// Reads a CapabilityStatement. An answer that is not one is an error (the worker then goes by
/// its settings alone).
pub fn parse(body: &[u8]) -> Result<Capabilities, String> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|_| "the server's metadata is not JSON".to_string())?;
    if v.get("resourceType").and_then(Value::as_str) != Some("CapabilityStatement") {
        return Err("the server's metadata is not a CapabilityStatement".into());
    }
    let mut caps = Capabilities {
        fhir_version: v
            .get("fhirVersion")
            .and_then(Value::as_str)
            .map(str::to_string),
        software: v
            .pointer("/software/name")
            .and_then(Value::as_str)
            .map(|n| n.chars().take(80).collect()),
        ..Default::default()
    };
    let rest = v.get("rest").and_then(Value::as_array).and_then(|r| {
        r.iter()
            .find(|r| r.get("mode").and_then(Value::as_str) == Some("server"))
    });
    let Some(rest) = rest else {
        return Ok(caps);
    };
    let codes = |v: &Value| -> Option<Vec<String>> {
        let list = v.get("interaction")?.as_array()?;
        Some(
            list.iter()
                .filter_map(|i| i.get("code")?.as_str().map(str::to_string))
                .collect(),
        )
    };
    if let Some(system) = codes(rest) {
        caps.batch = Some(system.iter().any(|c| c == "batch"));
        caps.transaction = Some(system.iter().any(|c| c == "transaction"));
    }
    for r in rest
        .get("resource")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let Some(t) = r.get("type").and_then(Value::as_str) else {
            continue;
        };
        caps.types.insert(
            t.to_string(),
            TypeCaps {
                interactions: codes(r),
                conditional_create: bool_at(r, "conditionalCreate"),
                conditional_update: bool_at(r, "conditionalUpdate"),
                update_create: bool_at(r, "updateCreate"),
                versioning: r
                    .get("versioning")
                    .and_then(Value::as_str)
                    .map(str::to_string),
            },
        );
    }
    Ok(caps)
}

impl Capabilities {
    /// How `resource_type` is written, from the configured write mode and what the server states.
    pub fn plan(&self, resource_type: &str, configured: WriteMode) -> Plan {
        let mut plan = Plan {
            write_mode: configured,
            if_match: true,
            delete: true,
            notes: Vec::new(),
        };
        let Some(t) = self.types.get(resource_type) else {
            return plan;
        };
        if t.has("update") == Some(false) && t.has("create") == Some(true) {
            if configured != WriteMode::CreateOnly {
                plan.notes.push(format!(
                    "the server takes no update of {resource_type}: written as create_only"
                ));
            }
            plan.write_mode = WriteMode::CreateOnly;
        } else if configured == WriteMode::Upsert
            && (t.conditional_update == Some(false) || t.update_create == Some(false))
        {
            // Only a conditional create the server promises: one that ignored If-None-Exist
            // would make a new resource for every retry.
            if t.conditional_create == Some(true) {
                plan.write_mode = WriteMode::Create;
                plan.notes.push(format!(
                    "the server takes no update-as-create of {resource_type}: first writes are conditional creates"
                ));
            } else {
                plan.notes.push(format!(
                    "the server takes no update-as-create of {resource_type} and does not state conditional create: first writes stay conditional updates and may be rejected; set write_mode if the server takes If-None-Exist"
                ));
            }
        }
        if configured != WriteMode::Upsert && t.conditional_create == Some(false) {
            plan.notes.push(format!(
                "write mode {} sends conditional creates, which the server states it does not take for {resource_type}",
                configured.name()
            ));
        }
        // Only a server that keeps no versions loses If-Match: one that keeps them but does not
        // promise version-aware updates ("versioned") ignores the header at worst, and where it
        // does honour it, it keeps a late, stale write from landing.
        if t.versioning.as_deref() == Some("no-version") {
            plan.if_match = false;
            plan.notes.push(format!(
                "the server keeps no versions of {resource_type}: updates are sent without If-Match"
            ));
        }
        if t.has("delete") == Some(false) {
            plan.delete = false;
            plan.notes.push(format!(
                "the server takes no delete of {resource_type}: deletes are dead-lettered as not_sendable"
            ));
        }
        plan
    }

    /// Whether Bundles of `kind` may be sent (false only when the server lists its system
    /// interactions and that one is not among them).
    pub fn bundles(&self, kind: BundleType) -> bool {
        match kind {
            BundleType::Batch => self.batch != Some(false),
            BundleType::Transaction => self.transaction != Some(false),
        }
    }

    /// A summary for `fhir_sync_server`: the server, and for each of `types` what it states.
    pub fn summary(&self, types: &[(&str, WriteMode)], bundles: Option<BundleType>) -> Value {
        let mut notes: Vec<String> = Vec::new();
        let resources: serde_json::Map<String, Value> = types
            .iter()
            .map(|(t, configured)| {
                let caps = self.types.get(*t);
                let plan = self.plan(t, *configured);
                notes.extend(plan.notes.iter().cloned());
                (
                    t.to_string(),
                    json!({
                        "listed": caps.is_some(),
                        "interactions": caps.and_then(|c| c.interactions.clone()),
                        "conditional_create": caps.and_then(|c| c.conditional_create),
                        "conditional_update": caps.and_then(|c| c.conditional_update),
                        "update_create": caps.and_then(|c| c.update_create),
                        "versioning": caps.and_then(|c| c.versioning.clone()),
                        "write_mode": plan.write_mode.name(),
                        "if_match": plan.if_match,
                        "delete": plan.delete,
                    }),
                )
            })
            .collect();
        if let Some(kind) = bundles {
            if !self.bundles(kind) {
                notes.push(format!(
                    "the server takes no {} Bundle: fhir_sync.bundle_size is not used, requests go one by one",
                    match kind {
                        BundleType::Batch => "batch",
                        BundleType::Transaction => "transaction",
                    }
                ));
            }
        }
        json!({
            "fhir_version": self.fhir_version,
            "software": self.software,
            "batch": self.batch,
            "transaction": self.transaction,
            "resources": resources,
            "notes": notes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn statement(resource: Value, system: Value) -> Capabilities {
        let doc = json!({"resourceType": "CapabilityStatement", "fhirVersion": "4.0.1",
                         "software": {"name": "EHR"},
                         "rest": [{"mode": "server", "interaction": system, "resource": [resource]}]});
        parse(&serde_json::to_vec(&doc).unwrap()).unwrap()
    }

    #[test]
    fn each_statement_changes_only_what_it_states() {
        use WriteMode::*;
        let i =
            |codes: &[&str]| json!(codes.iter().map(|c| json!({"code": c})).collect::<Vec<_>>());
        type Case = (&'static str, Value, WriteMode, (WriteMode, bool, bool));
        #[rustfmt::skip]
        let cases: Vec<Case> = vec![
            ("nothing stated: the settings stand",
             json!({"type": "Patient"}), Upsert, (Upsert, true, true)),
            ("everything allowed",
             json!({"type": "Patient", "interaction": i(&["create", "update", "delete"]), "conditionalUpdate": true,
                    "updateCreate": true, "versioning": "versioned-update"}), Upsert, (Upsert, true, true)),
            ("no update-as-create, conditional create stated: conditional creates",
             json!({"type": "Patient", "updateCreate": false, "conditionalCreate": true}), Upsert, (Create, true, true)),
            ("no conditional update, conditional create stated: conditional creates",
             json!({"type": "Patient", "conditionalUpdate": false, "conditionalCreate": true}), Upsert, (Create, true, true)),
            ("no update-as-create, conditional create not stated: the settings stand",
             json!({"type": "Patient", "updateCreate": false}), Upsert, (Upsert, true, true)),
            ("no conditional create either: the settings stand",
             json!({"type": "Patient", "conditionalUpdate": false, "conditionalCreate": false}), Upsert, (Upsert, true, true)),
            ("create and no update: create_only",
             json!({"type": "Patient", "interaction": i(&["create", "read"])}), Upsert, (CreateOnly, true, false)),
            ("no versions kept: no If-Match",
             json!({"type": "Patient", "versioning": "no-version"}), Create, (Create, false, true)),
            ("versions kept, version-aware updates not promised: If-Match still sent",
             json!({"type": "Patient", "versioning": "versioned"}), Create, (Create, true, true)),
            ("no delete",
             json!({"type": "Patient", "interaction": i(&["create", "update"])}), Upsert, (Upsert, true, false)),
        ];
        for (what, resource, configured, want) in cases {
            let p = statement(resource, json!([])).plan("Patient", configured);
            assert_eq!((p.write_mode, p.if_match, p.delete), want, "{what}");
            let changed = (p.write_mode, p.if_match, p.delete) != (configured, true, true);
            assert!(
                !changed || !p.notes.is_empty(),
                "{what}: a change comes with its reason"
            );
        }
        assert_eq!(
            statement(json!({"type": "Patient", "updateCreate": false}), json!([]))
                .plan("Encounter", Upsert)
                .write_mode,
            Upsert,
            "another type is not affected"
        );
    }

    #[test]
    fn bundles_are_refused_only_when_the_system_interactions_leave_them_out() {
        let none = statement(json!({"type": "Patient"}), Value::Null);
        assert!(none.bundles(BundleType::Batch) && none.bundles(BundleType::Transaction));
        let only_tx = statement(json!({"type": "Patient"}), json!([{"code": "transaction"}]));
        assert!(!only_tx.bundles(BundleType::Batch) && only_tx.bundles(BundleType::Transaction));
        let s = only_tx.summary(&[("Patient", WriteMode::Upsert)], Some(BundleType::Batch));
        assert_eq!(s["batch"], false);
        assert!(s["notes"][0].as_str().unwrap().contains("no batch Bundle"));
    }

    #[test]
    fn what_is_not_a_capability_statement_is_refused() {
        assert!(parse(b"<html>").is_err());
        assert!(parse(br#"{"resourceType": "OperationOutcome"}"#).is_err());
        assert_eq!(
            parse(br#"{"resourceType": "CapabilityStatement"}"#).unwrap(),
            Capabilities::default()
        );
    }
}
