//! Daemon wiring. STUB.
