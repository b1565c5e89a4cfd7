//! Builds a Hugging Face tokenizer from a SentencePiece `tokenizer.model` (LLaMA/Mistral BPE with byte
//! fallback), for checkpoints that ship no `tokenizer.json`. The `.model` file is a small protobuf
//! (`ModelProto`); only the fields that shape tokenisation are read. BPE merges are derived from the pieces
//! and ordered by piece score, as SentencePiece applies them.

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;

use serde_json::{Value, json};
use tokenizers::Tokenizer;

use crate::error::{Error, Result};

/// SentencePiece piece types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PieceType {
    /// An ordinary piece.
    Normal,
    /// `<unk>`.
    Unknown,
    /// `<s>`, `</s>` and other control symbols.
    Control,
    /// Pieces the trainer was told to keep whole.
    UserDefined,
    /// Never produced.
    Unused,
    /// `<0xNN>` byte-fallback pieces.
    Byte,
}

/// The parts of a SentencePiece model that matter for tokenisation.
#[derive(Debug, Clone)]
pub struct SentencePieceModel {
    /// (piece, score, type) in id order.
    pub pieces: Vec<(String, f32, PieceType)>,
    /// 1 unigram, 2 BPE, 3 word, 4 char.
    pub model_type: u64,
    /// Unknown bytes become `<0xNN>` pieces.
    pub byte_fallback: bool,
    /// A `▁` is prepended to the input.
    pub add_dummy_prefix: bool,
    /// Runs of spaces are collapsed and the ends trimmed.
    pub remove_extra_whitespaces: bool,
    /// Id of `<s>`, if any.
    pub bos_id: Option<u32>,
}

impl SentencePieceModel {
    /// Parses a serialized `ModelProto`.
    pub fn parse(bytes: &[u8]) -> std::result::Result<Self, String> {
        let mut m = SentencePieceModel {
            pieces: Vec::new(),
            model_type: 1,
            byte_fallback: false,
            add_dummy_prefix: true,
            remove_extra_whitespaces: true,
            bos_id: Some(1),
        };
        for field in Reader(bytes) {
            match field? {
                (1, Wire::Bytes(b)) => m.pieces.push(parse_piece(b)?),
                (2, Wire::Bytes(b)) => {
                    for f in Reader(b) {
                        match f? {
                            (3, Wire::Varint(v)) => m.model_type = v,
                            (35, Wire::Varint(v)) => m.byte_fallback = v != 0,
                            (41, Wire::Varint(v)) => m.bos_id = u32::try_from(v as i64).ok(),
                            _ => {}
                        }
                    }
                }
                (3, Wire::Bytes(b)) => {
                    for f in Reader(b) {
                        match f? {
                            (3, Wire::Varint(v)) => m.add_dummy_prefix = v != 0,
                            (4, Wire::Varint(v)) => m.remove_extra_whitespaces = v != 0,
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        if m.pieces.is_empty() {
            return Err("no pieces: not a SentencePiece model".into());
        }
        Ok(m)
    }

    /// The equivalent `tokenizer.json`, in the layout LLaMA/Mistral checkpoints ship.
    pub fn to_tokenizer_json(&self) -> std::result::Result<Value, String> {
        if self.model_type != 2 {
            return Err(format!(
                "SentencePiece model type {} is not supported (only BPE, as in LLaMA and Mistral)",
                self.model_type
            ));
        }
        let vocab: HashMap<&str, usize> = self
            .pieces
            .iter()
            .enumerate()
            .map(|(i, p)| (p.0.as_str(), i))
            .collect();
        let mut merges: Vec<(&str, &str, f32)> = Vec::new();
        for (piece, score, _) in &self.pieces {
            let mut local: Vec<(&str, &str, f32)> = piece
                .char_indices()
                .skip(1)
                .map(|(k, _)| (&piece[..k], &piece[k..]))
                .filter(|(l, r)| vocab.contains_key(l) && vocab.contains_key(r))
                .map(|(l, r)| (l, r, *score))
                .collect();
            local.sort_by_key(|(l, r, _)| (vocab[l], vocab[r]));
            merges.extend(local);
        }
        // Stable: pieces of equal score keep id order, as SentencePiece ranks them.
        merges.sort_by(|a, b| b.2.total_cmp(&a.2));
        let unk = self.pieces.iter().position(|p| p.2 == PieceType::Unknown);
        let added: Vec<Value> = self
            .pieces
            .iter()
            .enumerate()
            .filter(|(_, p)| matches!(p.2, PieceType::Unknown | PieceType::Control | PieceType::UserDefined))
            .map(|(i, p)| {
                json!({"id": i, "content": p.0, "single_word": false, "lstrip": false, "rstrip": false,
                       "normalized": false, "special": p.2 != PieceType::UserDefined})
            })
            .collect();
        let mut normalizers = Vec::new();
        if self.remove_extra_whitespaces {
            normalizers.push(json!({"type": "Strip", "strip_left": true, "strip_right": true}));
            normalizers
                .push(json!({"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}));
        }
        if self.add_dummy_prefix {
            normalizers.push(json!({"type": "Prepend", "prepend": "\u{2581}"}));
        }
        normalizers
            .push(json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}));
        let post = match self
            .bos_id
            .and_then(|id| self.pieces.get(id as usize).map(|p| (id, p.0.clone())))
        {
            Some((id, bos)) => json!({
                "type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {bos.clone(): {"id": bos, "ids": [id], "tokens": [bos]}}
            }),
            None => Value::Null,
        };
        let mut decoders =
            vec![json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "})];
        if self.byte_fallback {
            decoders.push(json!({"type": "ByteFallback"}));
        }
        decoders.push(json!({"type": "Fuse"}));
        if self.add_dummy_prefix {
            decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
        }
        let vocab_json: serde_json::Map<String, Value> = self
            .pieces
            .iter()
            .enumerate()
            .map(|(i, p)| (p.0.clone(), json!(i)))
            .collect();
        let merges_json: Vec<Value> = merges
            .iter()
            .map(|(l, r, _)| json!(format!("{l} {r}")))
            .collect();
        Ok(json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
            "normalizer": {"type": "Sequence", "normalizers": normalizers},
            "pre_tokenizer": null, "post_processor": post,
            "decoder": {"type": "Sequence", "decoders": decoders},
            "model": {"type": "BPE", "dropout": null, "unk_token": unk.map(|i| self.pieces[i].0.clone()),
                      "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": true,
                      "byte_fallback": self.byte_fallback, "ignore_merges": false,
                      "vocab": vocab_json, "merges": merges_json}
        }))
    }
}

/// Loads `tokenizer.model` and builds the equivalent Hugging Face tokenizer.
pub fn tokenizer_from_sentencepiece(path: &Path) -> Result<Tokenizer> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let model = SentencePieceModel::parse(&bytes).map_err(|m| Error::tokenizer(path, m))?;
    let json = model
        .to_tokenizer_json()
        .map_err(|m| Error::tokenizer(path, m))?;
    Tokenizer::from_str(&json.to_string())
        .map_err(|e| Error::tokenizer(path, format!("cannot build tokenizer: {e}")))
}

fn parse_piece(bytes: &[u8]) -> std::result::Result<(String, f32, PieceType), String> {
    let (mut piece, mut score, mut kind) = (String::new(), 0.0f32, PieceType::Normal);
    for f in Reader(bytes) {
        match f? {
            (1, Wire::Bytes(b)) => {
                piece = String::from_utf8(b.to_vec()).map_err(|_| "piece is not UTF-8")?
            }
            (2, Wire::Fixed32(v)) => score = f32::from_bits(v),
            (3, Wire::Varint(v)) => {
                kind = match v {
                    2 => PieceType::Unknown,
                    3 => PieceType::Control,
                    4 => PieceType::UserDefined,
                    5 => PieceType::Unused,
                    6 => PieceType::Byte,
                    _ => PieceType::Normal,
                }
            }
            _ => {}
        }
    }
    Ok((piece, score, kind))
}

/// A protobuf field value.
enum Wire<'a> {
    Varint(u64),
    Fixed64,
    Bytes(&'a [u8]),
    Fixed32(u32),
}

/// Iterates the fields of one protobuf message.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn varint(&mut self) -> std::result::Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&b, rest) = self.0.split_first().ok_or("truncated varint")?;
            self.0 = rest;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("varint too long".into())
    }
    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        if n > self.0.len() {
            return Err(format!("field of {n} bytes runs past the end of the file"));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
}

impl<'a> Iterator for Reader<'a> {
    type Item = std::result::Result<(u64, Wire<'a>), String>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.0.is_empty() {
            return None;
        }
        let item = (|| {
            let key = self.varint()?;
            let value = match key & 7 {
                0 => Wire::Varint(self.varint()?),
                1 => {
                    self.take(8)?;
                    Wire::Fixed64
                }
                2 => {
                    let n = self.varint()? as usize;
                    Wire::Bytes(self.take(n)?)
                }
                5 => Wire::Fixed32(u32::from_le_bytes(
                    self.take(4)?.try_into().expect("4 bytes"),
                )),
                w => return Err(format!("unsupported protobuf wire type {w}")),
            };
            Ok((key >> 3, value))
        })();
        if item.is_err() {
            self.0 = &[];
        }
        Some(item)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(p: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(p)
    }

    #[test]
    fn model_file_matches_tokenizer_json() {
        let from_model =
            tokenizer_from_sentencepiece(&fixture("tiny-tokenizer/tokenizer.model")).unwrap();
        let from_json = Tokenizer::from_file(fixture("tiny-tokenizer/tokenizer.json")).unwrap();
        let cases: Vec<Value> = serde_json::from_str(
            &std::fs::read_to_string(fixture("tiny-tokenizer/reference.json")).unwrap(),
        )
        .unwrap();
        for case in cases {
            let text = case["text"].as_str().unwrap();
            let want: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
            assert_eq!(
                from_json.encode(text, true).unwrap().get_ids(),
                want,
                "tokenizer.json on {text:?}"
            );
            assert_eq!(
                from_model.encode(text, true).unwrap().get_ids(),
                want,
                "tokenizer.model on {text:?}"
            );
            assert_eq!(
                from_model.decode(&want, true).unwrap(),
                from_json.decode(&want, true).unwrap()
            );
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(SentencePieceModel::parse(b"\x0a\xff\xff\xff").is_err());
        assert!(SentencePieceModel::parse(b"").is_err());
        assert!(SentencePieceModel::parse(&[0x0f, 0x01]).is_err());
    }
}
