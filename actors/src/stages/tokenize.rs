//! What the tokenizer stage does to a document besides encoding it with [`Tokenizer`] (`tokenizer.rs`): the BOS
//! that `tokenizer.add_bos` prepends, the same for the training stream, a resume's carry-over and the held-out set;
//! and the check that a Q&A template's control tokens are single tokens of the tokenizer.

use crate::stages::qa_format::PromptFormat;
use crate::stages::tokenizer::Tokenizer;

/// Prepends BOS to a non-empty document that does not start with it already (the `llama3` Q&A template writes
/// its own); returns how many tokens were inserted (0 or 1).
pub fn prepend_bos(tk: &Tokenizer, tokens: &mut Vec<u32>) -> u32 {
    match tk.bos_id() {
        Some(bos) if !tokens.is_empty() && tokens[0] != bos => {
            tokens.insert(0, bos);
            1
        }
        _ => 0,
    }
}

// Here rather than in `qa_format.rs`: the Q&A format stays below the tokenizer (the reader uses it, and the
// tokenizer's `tokenizer train` command reads through the reader).
impl PromptFormat {
    /// Fails, naming the token, when the tokenizer lacks one of [`special_tokens`](PromptFormat::special_tokens).
    pub fn check_tokenizer(&self, tok: &Tokenizer) -> anyhow::Result<()> {
        for t in self.special_tokens() {
            anyhow::ensure!(
                tok.token_id(t).is_some(),
                "qa template `{}` needs the special token {t} as one token, and tokenizer {} has none: use the \
                 Llama 3 tokenizer, or qa_template = \"plain\"",
                self.template.as_str(),
                tok.spec()
            );
        }
        Ok(())
    }
}
