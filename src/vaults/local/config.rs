//! `[vaults.NAME]` with `type = "local"`: the config, its check and its constructor.

use super::*;

/// `[vaults.NAME]` with `type = "local"`. `check` fills in every default,
/// so after it `dir`, `key_file` and `key_credential` are all set.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalConfig {
    /// Default: `<state_dir>/vaults/<name>`.
    pub dir: Option<PathBuf>,
    /// Key file; created 0600 on first start when missing. Default:
    /// `<state_dir>/<name>-vault.key`.
    pub key_file: Option<PathBuf>,
    /// Name of the systemd credential (`LoadCredential=`) holding the key.
    /// When the file names it, the key is that credential and a missing one
    /// is an error; when it is left out, `keyturn-<name>-vault-key` is used
    /// if `$CREDENTIALS_DIRECTORY` holds it, else the key file.
    pub key_credential: Option<String>,
    /// Set by `check` when the file names `key_credential`: then the key is
    /// that credential and nothing else (missing is an error).
    #[serde(skip)]
    pub key_credential_required: bool,
    pub max_concurrent: Option<usize>,
}

impl LocalConfig {
    /// `dir`, `key_file` and `key_credential`, which `check` always sets;
    /// `Invalid`, naming the first one missing, for a config never checked.
    pub(super) fn checked_paths(&self, name: &str) -> Result<(&Path, &Path, &str), PluginError> {
        let missing = |what: &str| {
            PluginError::new(
                ErrorKind::Invalid,
                format!("local vault {name}: no {what} (the config was not checked)"),
            )
        };
        let dir = self.dir.as_deref().ok_or_else(|| missing("dir"))?;
        let key_file = self
            .key_file
            .as_deref()
            .ok_or_else(|| missing("key_file"))?;
        let key_credential = self
            .key_credential
            .as_deref()
            .ok_or_else(|| missing("key_credential"))?;
        Ok((dir, key_file, key_credential))
    }
}

#[async_trait]
impl VaultPlugin for LocalConfig {
    fn check(&mut self, v: &mut Validator<'_>, p: Loc<'_>, scope: &VaultScope<'_>) {
        let name = scope.name;
        match &mut self.dir {
            Some(d) => v.resolve_path(p.key("dir"), d),
            None => self.dir = Some(scope.state_dir.join("vaults").join(name)),
        }
        match &mut self.key_file {
            Some(k) => v.resolve_path(p.key("key_file"), k),
            None => self.key_file = Some(scope.state_dir.join(format!("{name}-vault.key"))),
        }
        // Named in the file: the key must come from there (see `load_key`).
        self.key_credential_required = self.key_credential.is_some();
        let key_credential = self
            .key_credential
            .get_or_insert_with(|| format!("keyturn-{name}-vault-key"));
        // systemd credential names are file names in $CREDENTIALS_DIRECTORY.
        if key_credential.is_empty()
            || key_credential.contains('/')
            || key_credential == "."
            || key_credential == ".."
        {
            v.err(
                p.key("key_credential"),
                format!(
                    "invalid key_credential `{key_credential}`: it names a file in $CREDENTIALS_DIRECTORY, so it must be non-empty and contain no '/'"
                ),
            );
        }
    }

    fn max_concurrent(&self) -> Option<usize> {
        self.max_concurrent
    }

    fn open(&self, name: &str) -> Result<Arc<dyn Vault>, PluginError> {
        let (dir, key_file, key_credential) = self.checked_paths(name)?;
        let db = dir.join(super::DB_FILE);
        let sealed = std::fs::symlink_metadata(&db)
            .is_ok()
            .then_some(db.as_path());
        let key = load_key(
            key_file,
            key_credential,
            self.key_credential_required,
            sealed,
        )?;
        Ok(Arc::new(LocalVault::open(name, dir, key)?))
    }

    fn data_dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// Reads the key and the database's key check without creating or
    /// opening anything for writing (see [`super::probe`]).
    async fn probe(&self, name: &str) -> Result<Option<String>, PluginError> {
        let (config, name) = (self.clone(), name.to_owned());
        tokio::task::spawn_blocking(move || config.probe_files(&name))
            .await
            .map_err(|e| PluginError::new(ErrorKind::Fatal, format!("local vault probe: {e}")))?
    }
}
