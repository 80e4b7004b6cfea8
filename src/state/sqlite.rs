//! SQLite state store. STUB.
pub struct SqliteStore;
