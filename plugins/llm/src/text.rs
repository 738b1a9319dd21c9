//! Turning generated tokens into text as they come: incremental detokenization that never
//! emits half a UTF-8 character, and `stop` strings that are cut out and never streamed.

use cresset_torch::tokenizers::Tokenizer;

/// The text of one sequence, released piece by piece.
pub struct TextStream {
    ids: Vec<u32>,
    /// Characters already released.
    released: usize,
    stops: Vec<String>,
    /// The longest stop string, in characters: text that could still become one is held back.
    hold: usize,
    /// Set when a stop string was found; the text ends before it.
    stopped: bool,
    text: String,
}

impl TextStream {
    /// A stream that ends at the first of `stops`.
    pub fn new(stops: Vec<String>) -> Self {
        let hold = stops.iter().map(|s| s.chars().count()).max().unwrap_or(0);
        Self {
            ids: Vec::new(),
            released: 0,
            stops,
            hold,
            stopped: false,
            text: String::new(),
        }
    }

    /// Whether a stop string ended the text.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Add a token; returns the text that can be released now (possibly empty).
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> String {
        if self.stopped {
            return String::new();
        }
        self.ids.push(id);
        let decoded = tokenizer.decode(&self.ids, true).unwrap_or_default();
        // A trailing replacement character is usually half a multi-byte character.
        let complete = decoded.trim_end_matches('\u{FFFD}').to_owned();
        self.text = complete;
        if let Some(cut) = self.first_stop() {
            self.text.truncate(cut);
            self.stopped = true;
            return self.release(self.text.chars().count());
        }
        let total = self.text.chars().count();
        self.release(total.saturating_sub(self.hold.saturating_sub(1)))
    }

    /// Release everything left (at the end of generation).
    pub fn finish(&mut self, tokenizer: &Tokenizer) -> String {
        if !self.stopped {
            self.text = tokenizer.decode(&self.ids, true).unwrap_or_default();
            if let Some(cut) = self.first_stop() {
                self.text.truncate(cut);
                self.stopped = true;
            }
        }
        self.release(self.text.chars().count())
    }

    /// The whole text so far (released or not).
    pub fn text(&self) -> &str {
        &self.text
    }

    fn first_stop(&self) -> Option<usize> {
        self.stops
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| self.text.find(s.as_str()))
            .min()
    }

    fn release(&mut self, upto_chars: usize) -> String {
        if upto_chars <= self.released {
            return String::new();
        }
        let piece: String = self
            .text
            .chars()
            .skip(self.released)
            .take(upto_chars - self.released)
            .collect();
        self.released = upto_chars;
        piece
    }
}
