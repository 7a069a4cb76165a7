//! Layered configuration: built-in defaults < TOML file < `SLUICE_*` environment.
//!
//! Every binary describes its settings as one serde struct whose `Default` is
//! the single home of every default, with `#[serde(default,
//! deny_unknown_fields)]` so that a typo fails loudly. [`load`] layers the
//! sources; the binary then validates once into typed values. Environment
//! variables use `__` between levels: `SLUICE_PIPELINE__KEY_GROUPS=128`.

use std::path::Path;

use serde::Serialize;
use serde::de::DeserializeOwned;

/// `SLUICE_*` variables that are not settings (read elsewhere).
/// `SLUICE_INSTANCE_NAME` is the pod's name on Kubernetes (k8s/), the
/// identity an instance will hold key-group leases under.
const NOT_SETTINGS: &[&str] = &["SLUICE_LOG", "SLUICE_WORKLOAD_DIR", "SLUICE_INSTANCE_NAME"];

/// Settings that could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error("loading configuration{}: {source}", file.as_ref().map(|f| format!(" from {f}")).unwrap_or_default())]
pub struct SettingsError {
    file: Option<String>,
    #[source]
    source: Box<config::ConfigError>,
}

/// Settings every deployment shares.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PipelineSettings {
    /// Number of key groups P: the fixed partitions of device-keyed state,
    /// like a maximum parallelism. Fixed for a deployment's lifetime: changing
    /// it needs a fresh state directory.
    pub key_groups: u32,
}

impl Default for PipelineSettings {
    fn default() -> Self {
        Self { key_groups: 64 }
    }
}

/// Load `T`: its `Default`, then `file` (TOML) if given, then `SLUICE_*`
/// environment variables.
pub fn load<T: Serialize + DeserializeOwned + Default>(file: Option<&Path>) -> Result<T, SettingsError> {
    load_from(file, std::env::vars())
}

/// [`load`] with an explicit environment (for tests).
pub fn load_from<T: Serialize + DeserializeOwned + Default>(
    file: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<T, SettingsError> {
    let fail = |source: config::ConfigError| SettingsError {
        file: file.map(|f| f.display().to_string()),
        source: Box::new(source),
    };
    let defaults = config::Config::try_from(&T::default()).map_err(fail)?;
    let mut builder = config::Config::builder().add_source(defaults);
    if let Some(file) = file {
        builder = builder.add_source(config::File::from(file).format(config::FileFormat::Toml));
    }
    let env: config::Map<String, String> =
        env.into_iter().filter(|(k, _)| k.starts_with("SLUICE_") && !NOT_SETTINGS.contains(&k.as_str())).collect();
    builder = builder.add_source(
        config::Environment::with_prefix("SLUICE")
            .prefix_separator("_")
            .separator("__")
            .try_parsing(true)
            .source(Some(env)),
    );
    builder.build().and_then(|c| c.try_deserialize()).map_err(fail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, Serialize, serde::Deserialize, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Top {
        pipeline: PipelineSettings,
    }

    #[test]
    fn layers_defaults_file_and_env() -> Result<(), Box<dyn std::error::Error>> {
        let t: Top = load_from(None, [])?;
        assert_eq!(t.pipeline.key_groups, 64);

        let dir = tempfile::tempdir()?;
        let file = dir.path().join("s.toml");
        std::fs::write(&file, "[pipeline]\nkey_groups = 16\n")?;
        let t: Top = load_from(Some(&file), [])?;
        assert_eq!(t.pipeline.key_groups, 16);

        let env = [
            ("SLUICE_PIPELINE__KEY_GROUPS".to_string(), "8".to_string()),
            ("SLUICE_LOG".to_string(), "debug".to_string()),
        ];
        let t: Top = load_from(Some(&file), env)?;
        assert_eq!(t.pipeline.key_groups, 8);
        Ok(())
    }

    #[test]
    fn unknown_keys_fail_loudly() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("s.toml");
        std::fs::write(&file, "[pipeline]\nkey_grups = 16\n")?;
        let err = load_from::<Top>(Some(&file), []).expect_err("typo must fail");
        assert!(format!("{err:#}").contains("key_grups"), "{err:#}");
        Ok(())
    }
}
