//! The rotation engine. STUB.
