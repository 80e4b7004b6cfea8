//! Pure validation. STUB.
