//! The one macro behind the three plug-in registries (`vaults`, `targets`,
//! `sinks`): a config enum tagged by `type`, one variant per plug-in, each
//! holding that plug-in's own config struct (boxed: a credential carries its
//! target's config, and most credentials have none or a small one).
//!
//! ```ignore
//! registry! {
//!     /// `target = { type = ... }`.
//!     pub enum TargetConfig: TargetPlugin {
//!         None(NoTarget),
//!         Postgres(postgres::PostgresConfig),
//!     }
//! }
//! ```
//!
//! Attributes before `pub enum` go on the enum (`#[derive(serde::Serialize)]`
//! where the config is stored, as targets' are in footprints).
//! A variant may carry one `#[cfg(...)]` (the test-only `toy` vault does).
//! Comments in the list are plain `//` comments.
//!
//! It expands to the serde enum (`type = "none"`, `type = "postgres"`: the
//! variant name in snake_case) and `plugin()` / `plugin_mut()`, which hand out
//! the variant's config as `&dyn TargetPlugin`. Everything a registry does
//! with a plug-in goes through that trait, so a new plug-in is its own file
//! plus one line here.

macro_rules! registry {
    (
        $(#[$meta:meta])*
        pub enum $name:ident: $plugin:ident {
            $($(#[cfg($cfg:meta)])? $variant:ident($ty:ty),)+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, serde::Deserialize)]
        #[serde(tag = "type", rename_all = "snake_case")]
        pub enum $name {
            $($(#[cfg($cfg)])? $variant(Box<$ty>),)+
        }

        impl $name {
            /// The plug-in's own config behind its trait.
            pub fn plugin(&self) -> &dyn $plugin {
                match self {
                    $($(#[cfg($cfg)])? $name::$variant(c) => &**c,)+
                }
            }

            /// The same, to check and complete it in place.
            pub fn plugin_mut(&mut self) -> &mut dyn $plugin {
                match self {
                    $($(#[cfg($cfg)])? $name::$variant(c) => &mut **c,)+
                }
            }

            /// The `type` as written in the config (`aws_secrets_manager`).
            pub fn type_name(&self) -> String {
                let variant = match self {
                    $($(#[cfg($cfg)])? $name::$variant(_) => stringify!($variant),)+
                };
                $crate::plugin::snake_case(variant)
            }

            /// The plug-in's config, owned, behind its trait.
            pub fn into_plugin(self) -> Box<dyn $plugin> {
                match self {
                    $($(#[cfg($cfg)])? $name::$variant(c) => c,)+
                }
            }
        }
    };
}

pub(crate) use registry;

/// `AwsSecretsManager` → `aws_secrets_manager`: what serde's
/// `rename_all = "snake_case"` makes of a variant name.
pub(crate) fn snake_case(variant: &str) -> String {
    let mut out = String::with_capacity(variant.len() + 4);
    for (i, c) in variant.chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            out.push('_');
        }
        out.extend(c.to_lowercase());
    }
    out
}

#[cfg(test)]
mod tests {
    use crate::vaults::VaultSpec;

    #[test]
    fn type_name_is_the_type_serde_reads() {
        for text in [
            r#"type = "local""#,
            r#"type = "vault"
address = "http://127.0.0.1:8200""#,
            r#"type = "aws_secrets_manager""#,
            r#"type = "azure_key_vault"
vault_url = "https://x.vault.azure.net"
auth = "managed_identity""#,
        ] {
            let spec: VaultSpec = toml::from_str(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            let written = text.lines().next().unwrap();
            assert_eq!(written, format!("type = \"{}\"", spec.type_name()));
        }
    }
}
