//! The OpenAI chat-completions request, parsed and checked. Unknown fields are ignored (clients send many);
//! fields we cannot honour (`n > 1`, `logprobs`, `tools`) are refused rather than silently dropped.

use serde::Deserialize;

use super::error::ApiError;

/// A `POST /v1/chat/completions` body.
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    /// The model id (must be the served one).
    pub model: String,
    /// The conversation.
    pub messages: Vec<Message>,
    /// Sampling temperature, 0–2 (OpenAI's default 1; 0 = greedy).
    pub temperature: Option<f32>,
    /// Nucleus mass, (0, 1].
    pub top_p: Option<f32>,
    /// Most new tokens (legacy name).
    pub max_tokens: Option<u64>,
    /// Most new tokens.
    pub max_completion_tokens: Option<u64>,
    /// Seed for sampling.
    pub seed: Option<i64>,
    /// Stop strings.
    pub stop: Option<Stop>,
    /// Stream as server-sent events.
    #[serde(default)]
    pub stream: bool,
    /// Streaming options.
    pub stream_options: Option<StreamOptions>,
    /// Number of choices; only 1.
    pub n: Option<u32>,
    /// Log-probabilities are not computed.
    pub logprobs: Option<bool>,
    /// Tools are not supported.
    pub tools: Option<Vec<serde_json::Value>>,
}

/// `stop`: one string or a list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    /// One stop string.
    One(String),
    /// Several.
    Many(Vec<String>),
}

/// `stream_options`.
#[derive(Debug, Deserialize)]
pub struct StreamOptions {
    /// Send a last chunk with `usage`.
    #[serde(default)]
    pub include_usage: bool,
}

/// One chat message.
#[derive(Debug, Deserialize)]
pub struct Message {
    /// `system`, `developer`, `user` or `assistant`.
    pub role: String,
    /// Text, or a list of parts.
    pub content: Option<Content>,
}

/// Message content.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// Text and image parts.
    Parts(Vec<Part>),
}

/// A content part.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Part {
    /// `{"type":"text","text":…}`.
    Text {
        /// The text.
        text: String,
    },
    /// `{"type":"image_url","image_url":{"url":…}}`.
    ImageUrl {
        /// The image.
        image_url: ImageUrl,
    },
}

/// An image reference, with our DICOM extension fields.
#[derive(Debug, Clone, Deserialize)]
pub struct ImageUrl {
    /// `data:<mime>;base64,…` (or `file://` with `--allow-local-files`).
    pub url: String,
    /// Extension: DICOM frame, 0-based (default 0).
    pub frame: Option<usize>,
    /// Extension: DICOM window (`default`, `auto`, `lung`, … or `CENTER,WIDTH`).
    pub window: Option<String>,
}

/// Checked generation settings of a request.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Temperature (0 = greedy).
    pub temperature: f32,
    /// Nucleus mass.
    pub top_p: f32,
    /// Most new tokens, if limited.
    pub max_tokens: Option<usize>,
    /// Seed (random when the request has none).
    pub seed: u64,
    /// Stop strings.
    pub stop: Vec<String>,
}

/// Most stop strings per request (OpenAI's limit).
const MAX_STOPS: usize = 4;

impl ChatRequest {
    /// Parses a request body; malformed JSON and wrong types are 400s naming the problem.
    pub fn parse(body: &[u8]) -> Result<Self, ApiError> {
        serde_json::from_slice(body).map_err(|e| {
            let code = if e.is_syntax() || e.is_eof() {
                "invalid_json"
            } else {
                "invalid_request"
            };
            ApiError::bad_request(code, format!("request body: {e}"))
        })
    }

    /// Checks the fields against what we serve and returns the generation settings.
    pub fn settings(&self, served_model: &str) -> Result<Settings, ApiError> {
        if self.model != served_model {
            return Err(ApiError::not_found(
                "model_not_found",
                format!(
                    "the model `{}` is not served here; this server serves `{served_model}`",
                    self.model
                ),
            ));
        }
        if self.n.is_some_and(|n| n != 1) {
            return Err(ApiError::bad_request(
                "unsupported_parameter",
                "n: only one choice per request is supported (n = 1)",
            ));
        }
        if self.logprobs == Some(true) {
            return Err(ApiError::bad_request(
                "unsupported_parameter",
                "logprobs are not supported",
            ));
        }
        if self.tools.as_ref().is_some_and(|t| !t.is_empty()) {
            return Err(ApiError::bad_request(
                "unsupported_parameter",
                "tools are not supported by this model",
            ));
        }
        let temperature = self.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::bad_request(
                "invalid_value",
                format!("temperature must be between 0 and 2, not {temperature}"),
            ));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::bad_request(
                "invalid_value",
                format!("top_p must be in (0, 1], not {top_p}"),
            ));
        }
        let max_tokens = match self.max_completion_tokens.or(self.max_tokens) {
            Some(0) => {
                return Err(ApiError::bad_request(
                    "invalid_value",
                    "max_tokens must be at least 1",
                ));
            }
            Some(n) => Some(usize::try_from(n).unwrap_or(usize::MAX)),
            None => None,
        };
        let stop = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        if stop.len() > MAX_STOPS || stop.iter().any(String::is_empty) {
            return Err(ApiError::bad_request(
                "invalid_value",
                format!("stop: at most {MAX_STOPS} non-empty strings"),
            ));
        }
        let seed = match self.seed {
            Some(s) => s as u64,
            None => rand::random(),
        };
        Ok(Settings {
            temperature,
            top_p,
            max_tokens,
            seed,
            stop,
        })
    }

    /// Whether to send the last chunk with `usage` when streaming.
    pub fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_openai_bodies_and_checks_values() {
        let r = ChatRequest::parse(
            br#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"hi"},
            {"type":"image_url","image_url":{"url":"data:image/png;base64,AA==","window":"lung"}}]}],
            "temperature":0,"stop":"\n","max_tokens":5,"stream":true,"frequency_penalty":0}"#,
        )
        .unwrap();
        let s = r.settings("m").unwrap();
        assert_eq!(
            (s.temperature, s.max_tokens, s.stop.len()),
            (0.0, Some(5), 1)
        );
        assert!(r.stream);
        let Some(Content::Parts(parts)) = &r.messages[0].content else {
            panic!("parts")
        };
        assert!(
            matches!(&parts[1], Part::ImageUrl { image_url } if image_url.window.as_deref() == Some("lung"))
        );
        assert_eq!(r.settings("other").unwrap_err().status, 404);
        let e = ChatRequest::parse(b"{\"model\":").unwrap_err();
        assert_eq!((e.status.as_u16(), e.code), (400, "invalid_json"));
        let e = ChatRequest::parse(br#"{"model":"m","messages":7}"#).unwrap_err();
        assert_eq!(e.code, "invalid_request");
        for bad in [
            r#"{"model":"m","messages":[],"temperature":3}"#,
            r#"{"model":"m","messages":[],"top_p":0}"#,
            r#"{"model":"m","messages":[],"n":2}"#,
            r#"{"model":"m","messages":[],"max_tokens":0}"#,
            r#"{"model":"m","messages":[],"stop":["a","b","c","d","e"]}"#,
        ] {
            let e = ChatRequest::parse(bad.as_bytes())
                .unwrap()
                .settings("m")
                .unwrap_err();
            assert_eq!(e.status, 400, "{bad}");
        }
    }
}
