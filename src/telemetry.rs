//! Telemetry. STUB.
