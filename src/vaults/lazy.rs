//! A remote vault that connects on first use.
//!
//! Remote vault clients log in when they are created (AppRole, a token
//! lookup, credential discovery). Doing that while the catalog is built would
//! make a vault that is down at start-up, or on reload, stop the whole daemon,
//! and every other vault's credentials with it. Instead the catalog holds a
//! [`LazyVault`]; the first operation connects, and a failed connect is an
//! ordinary (usually transient) step error that the engine retries with
//! back-off, visible in `status`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::OnceCell;

use super::{
    CurrentMark, Pending, Promote, Promoted, Select, StoredVersion, Vault, VaultItem, VersionRef,
};
use crate::model::PluginError;

type ConnectFuture = Pin<Box<dyn Future<Output = Result<Arc<dyn Vault>, PluginError>> + Send>>;

pub struct LazyVault {
    name: String,
    connect: Box<dyn Fn() -> ConnectFuture + Send + Sync>,
    client: OnceCell<Arc<dyn Vault>>,
}

impl LazyVault {
    /// `connect` is called until it succeeds once; its result is kept.
    /// A remote vault that connects with `connect(name, config)` on first
    /// use (what each remote vault's `open` returns).
    pub fn connecting<C, F, Fut>(name: &str, config: C, connect: F) -> Arc<dyn Vault>
    where
        C: Clone + Send + Sync + 'static,
        F: Fn(String, C) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Arc<dyn Vault>, PluginError>> + Send + 'static,
    {
        let owned = name.to_owned();
        Arc::new(Self::new(name, move || {
            connect(owned.clone(), config.clone())
        }))
    }

    pub fn new<F, Fut>(name: &str, connect: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Arc<dyn Vault>, PluginError>> + Send + 'static,
    {
        Self {
            name: name.to_owned(),
            connect: Box::new(move || Box::pin(connect())),
            client: OnceCell::new(),
        }
    }

    async fn client(&self) -> Result<&Arc<dyn Vault>, PluginError> {
        self.client.get_or_try_init(|| (self.connect)()).await
    }
}

#[async_trait]
impl Vault for LazyVault {
    fn describe(&self) -> &str {
        &self.name
    }

    async fn close(&self) {
        if let Some(v) = self.client.get() {
            v.close().await;
        }
    }

    async fn stage(&self, new: Pending<'_>) -> Result<VersionRef, PluginError> {
        self.client().await?.stage(new).await
    }

    async fn read(
        &self,
        item: VaultItem<'_>,
        select: Select<'_>,
    ) -> Result<Option<StoredVersion>, PluginError> {
        self.client().await?.read(item, select).await
    }

    async fn promote(&self, item: VaultItem<'_>, version: &VersionRef) -> Result<(), PluginError> {
        self.client().await?.promote(item, version).await
    }

    /// Every remote vault (the only ones made lazy) reads the current
    /// version in its promote.
    fn promote_reads_current(&self) -> bool {
        true
    }

    async fn promote_from(&self, item: VaultItem<'_>, p: Promote<'_>) -> Promoted {
        self.client().await?.promote_from(item, p).await
    }

    async fn settle(&self, item: VaultItem<'_>, version: &VersionRef) -> Result<(), PluginError> {
        self.client().await?.settle(item, version).await
    }

    async fn retire(&self, item: VaultItem<'_>, version: &VersionRef) -> Result<(), PluginError> {
        self.client().await?.retire(item, version).await
    }

    async fn destroy(&self, item: VaultItem<'_>) -> Result<(), PluginError> {
        self.client().await?.destroy(item).await
    }

    async fn check(&self) -> Result<(), PluginError> {
        self.client().await?.check().await
    }

    async fn gone(&self, item: VaultItem<'_>, delivered: &VersionRef) -> Result<bool, PluginError> {
        self.client().await?.gone(item, delivered).await
    }

    async fn current_mark(&self, item: VaultItem<'_>) -> Result<Option<CurrentMark>, PluginError> {
        self.client().await?.current_mark(item).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;
    use crate::model::{AgentId, CredentialId, CredentialKey, ErrorKind, RotationId, SecretValue};
    use crate::vaults::local::{LocalKey, LocalVault};

    #[tokio::test]
    async fn connects_on_first_use_retries_a_failed_connect_and_then_keeps_the_client() {
        let dir = tempfile::tempdir().unwrap();
        let attempts = Arc::new(AtomicU32::new(0));
        let (a, path) = (attempts.clone(), dir.path().to_path_buf());
        let lazy = LazyVault::new("remote", move || {
            let n = a.fetch_add(1, Ordering::SeqCst);
            let path = path.clone();
            async move {
                if n == 0 {
                    return Err(PluginError::new(ErrorKind::Transient, "connection refused"));
                }
                let v: Arc<dyn Vault> =
                    Arc::new(LocalVault::open("remote", &path, LocalKey::generate())?);
                Ok(v)
            }
        });
        assert_eq!(
            attempts.load(Ordering::SeqCst),
            0,
            "no I/O before first use"
        );
        let err = lazy.check().await.unwrap_err();
        assert_eq!(err.kind, ErrorKind::Transient);
        lazy.check().await.expect("second connect succeeds");
        let key = CredentialKey::new(AgentId::new("a").unwrap(), CredentialId::new("c").unwrap());
        let item = VaultItem {
            key: &key,
            path: "a/c",
        };
        let rot = RotationId::generate();
        let v = lazy
            .stage(item.pending(&rot, &SecretValue::new(b"x".to_vec())))
            .await
            .unwrap();
        lazy.promote(item, &v).await.unwrap();
        assert_eq!(attempts.load(Ordering::SeqCst), 2, "the client is kept");
        assert_eq!(lazy.describe(), "remote");
    }
}
