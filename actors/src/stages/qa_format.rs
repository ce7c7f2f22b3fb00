//! The Q&A record and prompt format shared by the reader (Q&A JSON lines as training input), the config
//! (`input.qa_template`) and the Q&A tasks (`lexflow qa build`, `qa eval`, `generate`): a [`QaPair`] with its
//! [`Citation`]s, and the [`PromptFormat`] that turns a question and an answer into text.

use serde::{Deserialize, Serialize};

/// A cited provision: an act (CELEX) and optionally one of its articles (`"5"`, `"8a"`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Citation {
    pub celex: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub article: Option<String>,
}

/// One instruction-tuning example.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QaPair {
    /// Stable id: `celex:article:lang:kind`.
    pub id: String,
    pub lang: String,
    pub kind: String,
    pub celex: String,
    pub article: String,
    pub doc_type: String,
    pub question: String,
    pub answer: String,
    pub citations: Vec<Citation>,
    /// The FORMEX file the article comes from.
    pub source: String,
}

/// `input.qa_template`: how a Q&A pair becomes text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QaTemplate {
    /// `### Question\n{question}\n### Answer\n{answer}` (then the packer's end-of-text).
    #[default]
    Plain,
    /// The Llama 3 (Instruct) chat template: `<|begin_of_text|>`, an optional system turn, the user turn, the
    /// assistant header; the answer ends with `<|eot_id|>` (a training target: the model learns to end its turn).
    Llama3,
}

impl QaTemplate {
    pub fn as_str(&self) -> &'static str {
        match self {
            QaTemplate::Plain => "plain",
            QaTemplate::Llama3 => "llama3",
        }
    }
}

/// `--template` / `--system` of `lexflow qa eval`: None when neither is given (then the checkpoint decides).
pub fn parse_template(
    template: Option<&str>,
    system: Option<String>,
) -> anyhow::Result<Option<PromptFormat>> {
    let template = match template {
        None if system.is_none() => return Ok(None),
        None | Some("llama3") => QaTemplate::Llama3,
        Some("plain") => QaTemplate::Plain,
        Some(t) => anyhow::bail!("--template {t:?}: expected `plain` or `llama3`"),
    };
    anyhow::ensure!(
        system.is_none() || template == QaTemplate::Llama3,
        "--system needs --template llama3 (the plain template has no system turn)"
    );
    Ok(Some(PromptFormat { template, system }))
}

/// The prompt and answer text of a Q&A pair, for SFT (`lexflow run` on Q&A `.jsonl`) and for generation
/// (`lexflow qa eval --model`): both sides must use the same one.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PromptFormat {
    pub template: QaTemplate,
    /// System turn (`llama3` only).
    pub system: Option<String>,
}

impl PromptFormat {
    /// The text a model sees before its answer.
    pub fn prompt(&self, question: &str) -> String {
        match self.template {
            QaTemplate::Plain => format!("### Question\n{question}\n### Answer\n"),
            QaTemplate::Llama3 => {
                // As transformers renders Llama 3's `chat_template` with add_generation_prompt: contents trimmed.
                let turn = |role: &str, content: &str| {
                    format!(
                        "<|start_header_id|>{role}<|end_header_id|>\n\n{}<|eot_id|>",
                        content.trim()
                    )
                };
                let mut s = String::from("<|begin_of_text|>");
                if let Some(sys) = &self.system {
                    s += &turn("system", sys);
                }
                s += &turn("user", question);
                s += "<|start_header_id|>assistant<|end_header_id|>\n\n";
                s
            }
        }
    }

    /// The answer as trained on, up to the end of the assistant's turn.
    pub fn answer(&self, answer: &str) -> String {
        match self.template {
            QaTemplate::Plain => answer.to_string(),
            QaTemplate::Llama3 => format!("{}<|eot_id|>", answer.trim()),
        }
    }

    /// Special tokens the tokenizer must have as single tokens.
    pub fn special_tokens(&self) -> &'static [&'static str] {
        match self.template {
            QaTemplate::Plain => &[],
            QaTemplate::Llama3 => &[
                "<|begin_of_text|>",
                "<|start_header_id|>",
                "<|end_header_id|>",
                "<|eot_id|>",
            ],
        }
    }
}
