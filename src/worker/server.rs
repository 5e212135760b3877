//! What the worker learns from the server's CapabilityStatement: handed to the map and send
//! steps each cycle, and published once per statement (the log, and the fhir_sync_server view
//! through shared memory).

use super::{Tracks, Worker};
use fhir_sync_core::capability::Capabilities;
use std::sync::Arc;

impl Worker {
    /// The server's capabilities, when its CapabilityStatement could be read.
    pub(super) fn capabilities(&mut self, tracks: &Tracks) -> Option<Arc<Capabilities>> {
        let caps = self.client.as_ref()?.capabilities()?;
        let fresh = self
            .published
            .as_ref()
            .is_none_or(|p| !Arc::ptr_eq(p, &caps));
        if fresh {
            self.publish(&caps, tracks);
            self.published = Some(caps.clone());
        }
        Some(caps)
    }

    fn publish(&self, caps: &Capabilities, tracks: &Tracks) {
        let mut types: Vec<(&str, fhir_sync_core::send::WriteMode)> = tracks
            .values()
            .map(|t| {
                (
                    t.resource_type.as_str(),
                    t.write_mode.unwrap_or_else(crate::gucs::write_mode),
                )
            })
            .collect();
        types.sort_by(|a, b| a.0.cmp(b.0));
        types.dedup_by(|a, b| a.0 == b.0);
        let bundles = (crate::gucs::bundle_size() > 1).then(crate::gucs::bundle_type);
        let mut summary = caps.summary(&types, bundles);
        // A table's own write mode stands whatever the statement says (map.rs write_plan).
        for t in tracks.values() {
            if let Some(mode) = t.write_mode {
                summary["resources"][t.resource_type.as_str()]["write_mode"] = mode.name().into();
            }
        }
        summary["server_url"] = self.settings.base.clone().into();
        summary["read_at"] = chrono::Utc::now().to_rfc3339().into();
        // What the statement changes is configuration, never patient data: safe to log.
        for note in summary["notes"].as_array().into_iter().flatten() {
            if let Some(n) = note.as_str() {
                pgrx::log!("fhir_sync worker: the server's CapabilityStatement: {n}");
            }
        }
        self.shared.server.write(&summary.to_string());
    }
}
