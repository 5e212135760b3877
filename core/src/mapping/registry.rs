//! The built-in mappers, in one place: the name fhir_tracked records, the resource type, the
//! columns that make `fhir_track` pick it, the send order, and the columns that reference
//! another tracked table. `fhir_track`, the schema's CHECK, the worker and `fhir_preview` all read
//! this table (through `fhir_mapper_names()` and `fhir_builtin_mapper()` from SQL).

/// How a tracked table's rows become resources.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mapper {
    Patient,
    /// A child table of the patient table: its rows are identifiers of the parent's Patient.
    PatientIdentifier,
    Encounter,
    BloodPressure,
    Pulse,
    /// The table's own mapping function (fhir_track(..., map_function => ...)).
    Function,
}

/// A column that points at a row of another tracked table: its foreign key's target, or else
/// the tracked table of `mapper` with the same owner.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reference {
    pub column: &'static str,
    pub mapper: Mapper,
    pub resource_type: &'static str,
}

pub const PATIENT_REF: Reference = Reference {
    column: "patient_id",
    mapper: Mapper::Patient,
    resource_type: "Patient",
};
pub const ENCOUNTER_REF: Reference = Reference {
    column: "form_id",
    mapper: Mapper::Encounter,
    resource_type: "Encounter",
};

pub struct Spec {
    pub mapper: Mapper,
    pub name: &'static str,
    /// The resource type it makes (None: any, the mapping function says).
    pub resource_type: Option<&'static str>,
    /// Picked for a table of `resource_type` that has all of these columns ...
    pub requires: &'static [&'static str],
    /// ... and at least one of these (when not empty).
    pub any_of: &'static [&'static str],
    /// The column that tells this mapper from the others of its resource type, for a row mapped
    /// on its own (`fhir_observation_json`): a row that has it but lacks another required column
    /// gets the mapper's own error naming that column.
    pub marker: Option<&'static str>,
    /// Send order inside one batch: a Patient before the Encounters that point at it, those
    /// before the Observations that point at both.
    pub tier: usize,
    pub references: &'static [Reference],
}

/// In detection order: the first that fits is chosen.
pub const MAPPERS: [Spec; 6] = [
    Spec {
        mapper: Mapper::Patient,
        name: "patient",
        resource_type: Some("Patient"),
        requires: &["identifier_value", "identifier_system"],
        any_of: &["name_family", "name_given", "name_text", "birth_date"],
        marker: None,
        tier: 0,
        references: &[],
    },
    Spec {
        mapper: Mapper::PatientIdentifier,
        name: "patient_identifier",
        resource_type: Some("Patient"),
        requires: &["patient_id", "identifier_value"],
        any_of: &[],
        marker: None,
        tier: 0,
        references: &[PATIENT_REF],
    },
    Spec {
        mapper: Mapper::Encounter,
        name: "encounter",
        resource_type: Some("Encounter"),
        requires: &["patient_id", "encounter_date"],
        any_of: &[],
        marker: None,
        tier: 1,
        references: &[PATIENT_REF],
    },
    Spec {
        mapper: Mapper::BloodPressure,
        name: "blood_pressure",
        resource_type: Some("Observation"),
        requires: &["patient_id", "systolic_pressure", "diastolic_pressure"],
        any_of: &[],
        marker: Some("systolic_pressure"),
        tier: 2,
        references: &[PATIENT_REF, ENCOUNTER_REF],
    },
    Spec {
        mapper: Mapper::Pulse,
        name: "pulse",
        resource_type: Some("Observation"),
        requires: &["patient_id", "rate"],
        any_of: &[],
        marker: Some("rate"),
        tier: 2,
        references: &[PATIENT_REF, ENCOUNTER_REF],
    },
    Spec {
        mapper: Mapper::Function,
        name: "function",
        resource_type: None,
        requires: &[],
        any_of: &[],
        marker: None,
        tier: 0,
        references: &[],
    },
];

impl Mapper {
    pub fn spec(self) -> &'static Spec {
        MAPPERS
            .iter()
            .find(|s| s.mapper == self)
            .expect("every mapper has a spec")
    }

    pub fn name(self) -> &'static str {
        self.spec().name
    }

    pub fn tier(self) -> usize {
        self.spec().tier
    }

    pub fn parse(name: &str) -> Option<Mapper> {
        MAPPERS.iter().find(|s| s.name == name).map(|s| s.mapper)
    }
}

/// The built-in mapper for a table of `resource_type` with these columns, if one fits.
pub fn detect<S: AsRef<str>>(resource_type: &str, columns: &[S]) -> Option<Mapper> {
    let has = |c: &&str| columns.iter().any(|x| x.as_ref() == *c);
    MAPPERS
        .iter()
        .filter(|s| s.mapper != Mapper::Function)
        .find(|s| {
            s.resource_type == Some(resource_type)
                && s.requires.iter().all(&has)
                && (s.any_of.is_empty() || s.any_of.iter().any(&has))
        })
        .map(|s| s.mapper)
}

/// The mapper for one row mapped on its own, told by its marker column (see `Spec::marker`).
pub fn detect_by_marker<S: AsRef<str>>(resource_type: &str, columns: &[S]) -> Option<Mapper> {
    MAPPERS
        .iter()
        .find(|s| {
            s.resource_type == Some(resource_type)
                && s.marker
                    .is_some_and(|m| columns.iter().any(|c| c.as_ref() == m))
        })
        .map(|s| s.mapper)
}

/// Every mapper name, in order (what fhir_tracked.mapper may hold).
pub fn names() -> Vec<&'static str> {
    MAPPERS.iter().map(|s| s.name).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detection_follows_the_columns_and_the_resource_type() {
        let cases: [(&str, &[&str], Option<Mapper>); 8] = [
            (
                "Patient",
                &["id", "identifier_system", "identifier_value", "name_family"],
                Some(Mapper::Patient),
            ),
            (
                "Patient",
                &["id", "identifier_system", "identifier_value"],
                None,
            ),
            (
                "Patient",
                &["id", "patient_id", "identifier_value"],
                Some(Mapper::PatientIdentifier),
            ),
            (
                "Encounter",
                &["id", "patient_id", "encounter_date"],
                Some(Mapper::Encounter),
            ),
            (
                "Observation",
                &[
                    "id",
                    "patient_id",
                    "systolic_pressure",
                    "diastolic_pressure",
                ],
                Some(Mapper::BloodPressure),
            ),
            (
                "Observation",
                &["id", "patient_id", "rate"],
                Some(Mapper::Pulse),
            ),
            ("Observation", &["id", "rate"], None),
            ("Encounter", &["id", "patient_id", "rate"], None),
        ];
        for (ty, cols, want) in cases {
            assert_eq!(detect(ty, cols), want, "{ty} {cols:?}");
        }
    }

    #[test]
    fn a_row_on_its_own_is_told_by_its_marker_column() {
        // No diastolic_pressure: still blood pressure (its mapper then names the missing field).
        assert_eq!(
            detect_by_marker("Observation", &["id", "systolic_pressure"]),
            Some(Mapper::BloodPressure)
        );
        assert_eq!(
            detect_by_marker("Observation", &["id", "rate"]),
            Some(Mapper::Pulse)
        );
        assert_eq!(detect_by_marker("Observation", &["id", "note"]), None);
    }

    #[test]
    fn names_round_trip_and_tiers_put_patients_first() {
        for s in &MAPPERS {
            assert_eq!(Mapper::parse(s.name), Some(s.mapper));
            // A child table's rows belong to the referenced resource (same tier); every other
            // reference points at an earlier tier, sent first.
            for r in s.references {
                let child = s.mapper == Mapper::PatientIdentifier;
                assert!(
                    child || r.mapper.tier() < s.tier,
                    "{} refers to its own tier",
                    s.name
                );
            }
        }
        assert_eq!(Mapper::parse("nope"), None);
        // Rows tracked by earlier releases hold these names: fhir_tracked's CHECK (built from
        // names()) must keep accepting every one of them after ALTER EXTENSION UPDATE.
        for released in [
            "patient",
            "patient_identifier",
            "encounter",
            "blood_pressure",
            "pulse",
            "function",
        ] {
            assert!(names().contains(&released), "{released}");
        }
    }
}
