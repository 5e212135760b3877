//! Reading the server's answers: the id and version it gave a resource, its OperationOutcome,
//! and the failure text kept in the protected tables (never logged).

use crate::http::{is_fhir_id, Response, Transport};

/// "HTTP 422" plus the server's first diagnostic, or the transport error. Kept in the
/// protected tables only, never logged: a server may echo patient data in its diagnostics.
pub fn describe_failure(r: &Response) -> String {
    match r.transport {
        Transport::Status(s) => {
            let diag = operation_outcome(r).and_then(|o| {
                o.pointer("/issue/0/diagnostics")
                    .and_then(|d| d.as_str())
                    .map(str::to_string)
            });
            match diag {
                Some(d) => format!("HTTP {s}: {}", d.chars().take(500).collect::<String>()),
                None if (300..400).contains(&s) => format!("HTTP {s}: the server answered with a redirect, which fhir_sync does not follow"),
                None => format!("HTTP {s}"),
            }
        }
        _ => r.error.clone().unwrap_or_else(|| "request failed".into()),
    }
}

pub fn operation_outcome(r: &Response) -> Option<serde_json::Value> {
    let v: serde_json::Value = serde_json::from_slice(&r.body).ok()?;
    (v.get("resourceType")?.as_str()? == "OperationOutcome").then_some(v)
}

/// The id and version the server gave the resource: from the body, else Location
/// (…/Type/<id>/_history/<v>), else the ETag (W/"<v>"). Both go into URLs and headers later
/// (`Type/<id>`, `If-Match`), so anything that is not a FHIR id (`[A-Za-z0-9-.]{1,64}`, and not
/// `.` or `..`) is refused: a hostile server must not choose the path of our next request.
pub fn resource_id(r: &Response) -> Result<(Option<String>, Option<String>), &'static str> {
    let (id, version) = read_ids(r);
    if id.as_deref().is_some_and(|i| !is_fhir_id(i)) {
        return Err(
            "the server named the resource with an id that is not a FHIR id (not used in a URL)",
        );
    }
    if version.as_deref().is_some_and(|v| !is_fhir_id(v)) {
        return Err("the server gave a version that is not a FHIR id (not used in If-Match)");
    }
    Ok((id, version))
}

fn read_ids(r: &Response) -> (Option<String>, Option<String>) {
    // Typed: the stored resource's other fields are skipped, not built into values.
    let body: Option<crate::send::Stored> = serde_json::from_slice(&r.body).ok();
    let (mut id, mut version) = match body {
        Some(b) => (b.id, b.meta.and_then(|m| m.version_id)),
        None => (None, None),
    };
    if let Some(loc) = &r.location {
        let parts: Vec<&str> = loc.trim_end_matches('/').split('/').collect();
        if let Some(h) = parts.iter().position(|p| *p == "_history") {
            if id.is_none() && h >= 1 {
                id = Some(parts[h - 1].to_string());
            }
            if version.is_none() {
                version = parts.get(h + 1).map(|s| s.to_string());
            }
        } else if id.is_none() {
            id = parts.last().map(|s| s.to_string());
        }
    }
    if version.is_none() {
        version = r
            .etag
            .as_deref()
            .map(|e| e.trim_start_matches("W/").trim_matches('"').to_string());
    }
    (id, version)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(body: &str, location: Option<&str>, etag: Option<&str>) -> Response {
        Response {
            transport: Transport::Status(201),
            body: body.as_bytes().to_vec(),
            etag: etag.map(str::to_string),
            location: location.map(str::to_string),
            retry_after: None,
            elapsed: std::time::Duration::ZERO,
            error: None,
        }
    }

    #[test]
    fn ids_and_versions_come_from_body_location_or_etag() {
        type Case<'a> = (
            &'a str,
            Option<&'a str>,
            Option<&'a str>,
            (Option<&'a str>, Option<&'a str>),
        );
        let cases: &[Case] = &[
            (
                r#"{"resourceType":"Patient","id":"p1","meta":{"versionId":"3"}}"#,
                None,
                None,
                (Some("p1"), Some("3")),
            ),
            (
                "",
                Some("http://x/fhir/Patient/p2/_history/4"),
                None,
                (Some("p2"), Some("4")),
            ),
            (
                "",
                Some("Patient/p3"),
                Some("W/\"9\""),
                (Some("p3"), Some("9")),
            ),
            ("", None, None, (None, None)),
        ];
        for (body, loc, etag, want) in cases {
            let got = resource_id(&answer(body, *loc, *etag)).unwrap();
            assert_eq!(
                (got.0.as_deref(), got.1.as_deref()),
                *want,
                "{body} {loc:?} {etag:?}"
            );
        }
    }

    #[test]
    fn an_id_or_version_that_could_steer_a_url_is_refused() {
        for bad in [
            "a/b",
            "a?b=c",
            "..",
            ".",
            "a b",
            "x%2F..",
            &"x".repeat(65),
            "é",
        ] {
            let body = format!(
                r#"{{"resourceType":"Patient","id":{}}}"#,
                serde_json::json!(bad)
            );
            assert!(
                resource_id(&answer(&body, None, None)).is_err(),
                "id {bad:?}"
            );
            let body = format!(
                r#"{{"resourceType":"Patient","id":"ok","meta":{{"versionId":{}}}}}"#,
                serde_json::json!(bad)
            );
            assert!(
                resource_id(&answer(&body, None, None)).is_err(),
                "version {bad:?}"
            );
        }
        assert!(resource_id(&answer("", Some("Patient/p?_format=x"), None)).is_err());
        for good in ["p1", "A-b.9", &"x".repeat(64)] {
            assert!(is_fhir_id(good), "{good}");
        }
    }
}
