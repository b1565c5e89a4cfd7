//! The model's tokenizer (`tokenizer.json`, or one built from `tokenizer.model`) and LLaVA's way of
//! tokenising a prompt around image placeholders.

use std::path::{Path, PathBuf};

use tokenizers::Tokenizer;

use super::sentencepiece::tokenizer_from_sentencepiece;
use super::template::IMAGE_PLACEHOLDER;
use crate::error::{Error, Result};
use crate::llava::IMAGE_SLOT;

/// A tokenizer plus the facts generation needs.
#[derive(Clone)]
pub struct PromptTokenizer {
    inner: Tokenizer,
    source: PathBuf,
}

impl PromptTokenizer {
    /// Loads `tokenizer.json` from `dir`, else builds it from `tokenizer.model`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let json = dir.join("tokenizer.json");
        let spm = dir.join("tokenizer.model");
        let inner = if json.is_file() {
            Tokenizer::from_file(&json)
                .map_err(|e| Error::tokenizer(&json, format!("cannot load: {e}")))?
        } else if spm.is_file() {
            tokenizer_from_sentencepiece(&spm)?
        } else {
            return Err(Error::tokenizer(
                dir,
                "no tokenizer.json or tokenizer.model in the model folder",
            ));
        };
        let source = if json.is_file() { json } else { spm };
        Ok(Self { inner, source })
    }

    /// The file the tokenizer came from.
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// The underlying Hugging Face tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }

    /// Id of a token given by its text (special tokens included).
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Encodes one piece of text with the tokenizer's special tokens (BOS where it adds one).
    pub fn encode_text(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, true)
            .map_err(|e| Error::tokenizer(&self.source, format!("cannot encode: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// LLaVA's `tokenizer_image_token`: splits on `<image>`, tokenises each piece, keeps BOS only on the
    /// first piece, and puts [`IMAGE_SLOT`] between pieces.
    pub fn encode_prompt(&self, prompt: &str) -> Result<Vec<i64>> {
        let chunks = prompt
            .split(IMAGE_PLACEHOLDER)
            .map(|c| self.encode_text(c))
            .collect::<Result<Vec<_>>>()?;
        // LLaVA strips BOS from every later chunk when the first one starts with it; `encode("")` is exactly
        // the BOS when the tokenizer adds one.
        let empty = self.encode_text("")?;
        let adds_bos = empty.len() == 1 && chunks[0].first() == empty.first();
        let mut ids = Vec::new();
        for (i, chunk) in chunks.iter().enumerate() {
            if i > 0 {
                ids.push(IMAGE_SLOT);
            }
            let skip = usize::from(adds_bos && i > 0);
            ids.extend(chunk.iter().skip(skip).map(|&t| i64::from(t)));
        }
        Ok(ids)
    }

    /// Decodes ids to text, skipping special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| Error::tokenizer(&self.source, format!("cannot decode: {e}")))
    }
}

/// Turns a growing list of generated ids into text pieces, emitting only complete characters (a multi-byte
/// character split across byte-fallback tokens is held back until its last byte arrives).
#[derive(Default)]
pub struct StreamDecoder {
    ids: Vec<u32>,
    emitted: usize,
}

impl StreamDecoder {
    /// Adds one id; returns the new text it completes, if any.
    pub fn push(&mut self, tok: &PromptTokenizer, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let text = tok.decode(&self.ids)?;
        if text.ends_with('\u{FFFD}') {
            return Ok(None);
        }
        // Decoding may rewrite earlier text (e.g. a leading space stripped only at the start); only emit
        // from the longest common prefix with what was already emitted.
        let new = if text.len() >= self.emitted && text.is_char_boundary(self.emitted) {
            text[self.emitted..].to_string()
        } else {
            String::new()
        };
        self.emitted = text.len();
        Ok((!new.is_empty()).then_some(new))
    }

    /// Everything decoded so far.
    pub fn text(&self, tok: &PromptTokenizer) -> Result<String> {
        tok.decode(&self.ids)
    }
}
