//! Configuration files of both binaries (`coordinator.toml`, `client.toml`): bounded reading, TOML parsing
//! with unknown keys refused by the caller's schema, and one typed error whose message is one line naming
//! the file, the line and the column. What must never live here: any schema (each crate owns its own).

use std::path::Path;

/// Largest configuration file read.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// What can be wrong with a configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// It could not be read.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// It is not valid TOML for this schema (unknown keys included).
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// The parser's message (line, column, key).
        message: String,
    },
    /// A value is out of range.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
}

/// Reads a configuration file of at most 1 MiB.
pub fn read(path: &Path) -> Result<String, ConfigError> {
    let p = path.display().to_string();
    let io = |source| ConfigError::Io {
        path: p.clone(),
        source,
    };
    let len = std::fs::metadata(path).map_err(io)?.len();
    if len > MAX_CONFIG_BYTES {
        return Err(ConfigError::Invalid {
            path: p,
            message: format!("{len} bytes, more than the {MAX_CONFIG_BYTES} allowed"),
        });
    }
    std::fs::read_to_string(path).map_err(io)
}

/// Parses TOML `text` (from `origin`) into `T`; errors are one line: `line L, column C: message`.
pub fn parse<T: serde::de::DeserializeOwned>(text: &str, origin: &str) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e: toml::de::Error| {
        let message = e.message().trim().replace('\n', " ");
        let message = match e.span() {
            Some(span) => {
                let before = text.get(..span.start).unwrap_or(text);
                let line = before.matches('\n').count() + 1;
                let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                format!("line {line}, column {column}: {message}")
            }
            None => message,
        };
        ConfigError::Parse {
            path: origin.into(),
            message,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct S {
        a: u32,
    }

    #[test]
    fn errors_are_one_line_with_position() {
        let err = parse::<S>("a = 1\nb = 2\n", "x.toml")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("x.toml: line 2, column 1:"), "{err}");
        assert!(err.contains('b') && !err.contains('\n'), "{err}");
        assert!(matches!(
            read(Path::new("/no/such.toml")),
            Err(ConfigError::Io { .. })
        ));
    }
}
