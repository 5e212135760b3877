"""End-to-end test harness for fhir_sync: PostgreSQL clusters, a Helios FHIR server, a fault-injecting FHIR stub,
and (monitoring.py) what the docker/ monitoring files must agree on, shared with tests/lint."""
