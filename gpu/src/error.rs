//! The one error type of the crate: every variant says what was being done and, for files, where.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("libtorch: {0}")]
    Tch(#[from] tch::TchError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: invalid safetensors: {message}")]
    Safetensors { path: PathBuf, message: String },
    #[error("model config: {0}")]
    Config(String),
    #[error("{path}: {message}")]
    Checkpoint { path: PathBuf, message: String },
    #[error("batch: {0}")]
    Batch(String),
    #[error("collective (rank {rank}): {message}")]
    Collective { rank: usize, message: String },
}

impl GpuError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        GpuError::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn checkpoint(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        GpuError::Checkpoint {
            path: path.into(),
            message: message.into(),
        }
    }
}

pub type Result<T, E = GpuError> = std::result::Result<T, E>;
