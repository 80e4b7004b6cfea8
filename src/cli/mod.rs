//! CLI. STUB.
