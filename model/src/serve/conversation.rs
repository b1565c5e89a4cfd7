//! OpenAI messages → the template's turns. An image goes where its message puts it: at the `<image>`
//! placeholder when the message's text has one, else at the front of that message's text (where LLaVA-Med
//! was trained to see it). Consecutive user messages form one turn; system (and `developer`) messages
//! become the system prompt.

use super::api::{Content, ImageUrl, Message, Part};
use super::error::ApiError;
use crate::prompt::IMAGE_PLACEHOLDER;

/// A conversation ready for [`crate::engine::Engine::conversation_ids`].
#[derive(Debug, Default)]
pub struct Conversation {
    /// The system prompt, if any message gave one.
    pub system: Option<String>,
    /// (user text with `<image>` placeholders, the assistant's answer or `None` for the last turn).
    pub turns: Vec<(String, Option<String>)>,
    /// The images, in placeholder order.
    pub images: Vec<ImageUrl>,
}

/// Most images in one request: each takes hundreds of context positions.
pub const MAX_IMAGES: usize = 4;

impl Conversation {
    /// Builds the conversation; the last message must be the user's.
    pub fn from_messages(messages: &[Message]) -> Result<Self, ApiError> {
        let mut conv = Conversation::default();
        if messages.is_empty() {
            return Err(ApiError::bad_request(
                "invalid_request",
                "messages: at least one message is needed",
            ));
        }
        for (i, m) in messages.iter().enumerate() {
            let at = |what: &str| format!("messages[{i}]: {what}");
            match m.role.as_str() {
                "system" | "developer" => {
                    let (text, images) = split(m, i)?;
                    if !images.is_empty() {
                        return Err(ApiError::bad_request(
                            "invalid_request",
                            at("a system message cannot hold images"),
                        ));
                    }
                    conv.system = Some(match conv.system.take() {
                        Some(s) => format!("{s}\n\n{text}"),
                        None => text,
                    });
                }
                "user" => {
                    let (text, images) = split(m, i)?;
                    let placeholders = text.matches(IMAGE_PLACEHOLDER).count();
                    let text = if placeholders == 0 {
                        format!(
                            "{}{text}",
                            format!("{IMAGE_PLACEHOLDER}\n").repeat(images.len())
                        )
                    } else if placeholders == images.len() {
                        text
                    } else {
                        return Err(ApiError::bad_request(
                            "invalid_request",
                            at(&format!(
                                "the text has {placeholders} `{IMAGE_PLACEHOLDER}` placeholder(s) but \
                                 the message has {} image(s)",
                                images.len()
                            )),
                        ));
                    };
                    conv.images.extend(images);
                    match conv.turns.last_mut() {
                        Some((user, None)) => {
                            user.push('\n');
                            user.push_str(&text);
                        }
                        _ => conv.turns.push((text, None)),
                    }
                }
                "assistant" => {
                    let (text, images) = split(m, i)?;
                    if !images.is_empty() {
                        return Err(ApiError::bad_request(
                            "invalid_request",
                            at("an assistant message cannot hold images"),
                        ));
                    }
                    match conv.turns.last_mut() {
                        Some((_, answer @ None)) => *answer = Some(text),
                        _ => {
                            return Err(ApiError::bad_request(
                                "invalid_request",
                                at("an assistant message must follow a user message"),
                            ));
                        }
                    }
                }
                other => {
                    return Err(ApiError::bad_request(
                        "invalid_request",
                        at(&format!(
                            "role `{other}` is not supported (system, user, assistant)"
                        )),
                    ));
                }
            }
        }
        if !matches!(conv.turns.last(), Some((_, None))) {
            return Err(ApiError::bad_request(
                "invalid_request",
                "messages: the last message must be the user's",
            ));
        }
        if conv.images.len() > MAX_IMAGES {
            return Err(ApiError::bad_request(
                "invalid_request",
                format!(
                    "{} images in one request; at most {MAX_IMAGES}",
                    conv.images.len()
                ),
            ));
        }
        Ok(conv)
    }
}

/// A message's text (parts joined by newlines) and its images.
fn split(m: &Message, i: usize) -> Result<(String, Vec<ImageUrl>), ApiError> {
    match &m.content {
        None => Err(ApiError::bad_request(
            "invalid_request",
            format!("messages[{i}]: content is missing"),
        )),
        Some(Content::Text(t)) => Ok((t.clone(), Vec::new())),
        Some(Content::Parts(parts)) => {
            let mut texts = Vec::new();
            let mut images = Vec::new();
            for p in parts {
                match p {
                    Part::Text { text } => texts.push(text.as_str()),
                    Part::ImageUrl { image_url } => images.push(image_url.clone()),
                }
            }
            Ok((texts.join("\n"), images))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::api::ChatRequest;

    fn conv(messages: &str) -> Result<Conversation, ApiError> {
        let r = ChatRequest::parse(format!(r#"{{"model":"m","messages":{messages}}}"#).as_bytes())?;
        Conversation::from_messages(&r.messages)
    }

    const IMG: &str = r#"{"type":"image_url","image_url":{"url":"data:,"}}"#;

    #[test]
    fn images_go_to_the_front_of_their_message_unless_placed() {
        let c = conv(&format!(
            r#"[{{"role":"system","content":"S"}},
               {{"role":"user","content":[{{"type":"text","text":"What is it?"}},{IMG}]}}]"#
        ))
        .unwrap();
        assert_eq!(c.system.as_deref(), Some("S"));
        assert_eq!(c.turns, [("<image>\nWhat is it?".to_string(), None)]);
        assert_eq!(c.images.len(), 1);
        let c = conv(&format!(
            r#"[{{"role":"user","content":"Hi"}},{{"role":"assistant","content":"Hello"}},
               {{"role":"user","content":[{{"type":"text","text":"Look: <image> ok?"}},{IMG}]}}]"#
        ))
        .unwrap();
        assert_eq!(
            c.turns,
            [
                ("Hi".to_string(), Some("Hello".to_string())),
                ("Look: <image> ok?".to_string(), None)
            ]
        );
    }

    #[test]
    fn refuses_conversations_the_template_cannot_render() {
        for (messages, needle) in [
            ("[]", "at least one"),
            (r#"[{"role":"assistant","content":"x"}]"#, "must follow"),
            (
                r#"[{"role":"user","content":"a"},{"role":"assistant","content":"b"}]"#,
                "last message",
            ),
            (r#"[{"role":"tool","content":"x"}]"#, "not supported"),
            (r#"[{"role":"user"}]"#, "content is missing"),
            (
                r#"[{"role":"user","content":"<image> <image>"}]"#,
                "placeholder",
            ),
        ] {
            let e = conv(messages).unwrap_err();
            assert_eq!(e.status, 400);
            assert!(e.message.contains(needle), "{messages}: {}", e.message);
        }
        let five = [IMG; 5].join(",");
        let e = conv(&format!(r#"[{{"role":"user","content":[{five}]}}]"#)).unwrap_err();
        assert!(e.message.contains("at most 4"), "{}", e.message);
        let c = conv(r#"[{"role":"user","content":"a"},{"role":"user","content":"b"}]"#).unwrap();
        assert_eq!(c.turns, [("a\nb".to_string(), None)]);
    }
}
