//! Stop strings over streamed text: text that might be the start of a stop string is held back until it
//! is known not to be, so what was streamed always equals the final answer (nothing of a stop string
//! reaches a client and nothing before it is lost).

/// Scans a growing answer for stop strings.
#[derive(Debug, Default)]
pub struct StopScanner {
    stops: Vec<String>,
    text: String,
    emitted: usize,
}

impl StopScanner {
    /// A scanner for `stops` (empty strings are ignored).
    pub fn new(stops: &[String]) -> Self {
        Self {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            ..Self::default()
        }
    }

    /// Adds a piece of text; returns the text now safe to emit, and whether a stop string was found (the
    /// text then ends just before it).
    pub fn push(&mut self, piece: &str) -> (String, bool) {
        let searched_from = self.emitted;
        self.text.push_str(piece);
        let found = self
            .stops
            .iter()
            .filter_map(|s| self.text[searched_from..].find(s.as_str()))
            .min();
        if let Some(at) = found {
            self.text.truncate(searched_from + at);
            return (self.take_until(self.text.len()), true);
        }
        let keep_from = self.possible_stop_start();
        (self.take_until(keep_from), false)
    }

    /// Ends the answer (EOS, length or cancellation): returns whatever was held back.
    pub fn finish(&mut self) -> String {
        self.take_until(self.text.len())
    }

    /// The answer so far (held-back text included).
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Where the earliest suffix that is a proper prefix of some stop string begins (the text length when
    /// there is none).
    fn possible_stop_start(&self) -> usize {
        let mut start = self.text.len();
        for stop in &self.stops {
            let from = self
                .text
                .len()
                .saturating_sub(stop.len() - 1)
                .max(self.emitted);
            if let Some(i) = (from..self.text.len())
                .filter(|&i| self.text.is_char_boundary(i))
                .find(|&i| stop.starts_with(&self.text[i..]))
            {
                start = start.min(i);
            }
        }
        start
    }

    fn take_until(&mut self, end: usize) -> String {
        let out = self.text[self.emitted..end].to_string();
        self.emitted = end;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (Vec<String>, bool, String) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut s = StopScanner::new(&stops);
        let mut out = Vec::new();
        for p in pieces {
            let (emit, stop) = s.push(p);
            out.push(emit);
            if stop {
                return (out, true, s.text().to_string());
            }
        }
        out.push(s.finish());
        (out, false, s.text().to_string())
    }

    #[test]
    fn a_stop_string_split_across_pieces_is_never_streamed() {
        let (out, stopped, text) = run(&["\n\n"], &["Hello", "\n", "\nworld"]);
        assert!(stopped);
        assert_eq!(out, ["Hello", "", ""]);
        assert_eq!(text, "Hello");
        assert_eq!(out.concat(), text);
    }

    #[test]
    fn held_back_text_is_released_when_it_is_not_a_stop() {
        let (out, stopped, text) = run(&["END"], &["a E", "N", "x", " b"]);
        assert!(!stopped);
        assert_eq!(out, ["a ", "", "ENx", " b", ""]);
        assert_eq!(out.concat(), text);
        let (out, _, text) = run(&["END"], &["so E"]);
        assert_eq!(out, ["so ", "E"]);
        assert_eq!(text, "so E");
    }

    #[test]
    fn the_earliest_of_several_stops_wins_and_multibyte_text_is_safe() {
        let (out, stopped, text) = run(&["bé", "é!"], &["aé", "!b"]);
        assert!(stopped);
        assert_eq!(text, "a");
        assert_eq!(out.concat(), "a");
        let (out, stopped, _) = run(&[], &["x", "y"]);
        assert!(!stopped);
        assert_eq!(out.concat(), "xy");
    }
}
