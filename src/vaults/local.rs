//! The embedded local vault. STUB: to be implemented.
