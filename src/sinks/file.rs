//! Atomic file sink. STUB.
