//! STUB.
pub struct AuditLog;
