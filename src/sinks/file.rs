//! STUB.
use std::path::PathBuf;

use async_trait::async_trait;

use super::{Delivered, Notice, Sink};
use crate::config::FileSinkConfig;
use crate::model::{CredentialKey, PluginError, SecretValue};

pub struct FileSink;

impl FileSink {
    pub fn new(_cfg: FileSinkConfig, _roots: Vec<PathBuf>) -> Result<FileSink, PluginError> {
        unimplemented!()
    }
}

#[async_trait]
impl Sink for FileSink {
    fn describe(&self) -> String {
        unimplemented!()
    }
    async fn deliver(&self, _: &Notice, _: &SecretValue) -> Result<Delivered, PluginError> {
        unimplemented!()
    }
    async fn retract(&self, _: &CredentialKey) -> Result<(), PluginError> {
        unimplemented!()
    }
    async fn preflight(&self) -> Result<(), PluginError> {
        unimplemented!()
    }
}
