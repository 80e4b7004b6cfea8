//! Raw serde structs (deny_unknown_fields). STUB.
