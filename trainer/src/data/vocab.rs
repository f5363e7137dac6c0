//! The fixed character vocabulary: `0`..`9` → 0..9, `+` 10, `-` 11, `H` 12, `B` 13, `L` 14, `.` 15,
//! newline 16, `<|bos|>` 17, and ids 18..31 unused padding (a vocabulary of 32 keeps matrix shapes
//! multiples of 32).
//!
//! Text is bytes here: every vocabulary character is one ASCII byte, so a 256-entry table maps a
//! byte to its id and anything else (a CR, a lowercase letter, the first byte of a multi-byte UTF-8
//! character) to [`INVALID`].

use crate::user_bail;

pub const VOCAB_SIZE: usize = 32;
/// Starts every document. [`decode`] drops it: it is not a character.
pub const BOS: u8 = 17;
/// The id of `\n`.
pub const NEWLINE: u8 = 16;
/// The characters, in id order.
pub const CHARS: &[u8; 17] = b"0123456789+-HBL.\n";
/// What users read in error messages.
pub const ALLOWED: &str = "0-9 + - H B L . and newline";
/// The table's mark for a byte outside the vocabulary; its high bit lets a scan OR ids together
/// and check once per chunk.
pub const INVALID: u8 = 0xFF;

/// Byte → id, [`INVALID`] for bytes outside the vocabulary.
pub static TABLE: [u8; 256] = {
    let mut t = [INVALID; 256];
    let mut i = 0;
    while i < CHARS.len() {
        t[CHARS[i] as usize] = i as u8;
        i += 1;
    }
    t
};

/// The id of a byte, if it is a vocabulary character.
#[inline]
pub fn id_of(byte: u8) -> Option<u8> {
    let id = TABLE[byte as usize];
    (id != INVALID).then_some(id)
}

/// Text → ids, or the byte offset of the first byte outside the vocabulary (describe it with
/// [`describe_invalid`]`(&text[offset..])`). No BOS is added.
pub fn encode(text: &[u8]) -> Result<Vec<u8>, usize> {
    let ids: Vec<u8> = text.iter().map(|&b| TABLE[b as usize]).collect();
    match ids.iter().position(|&id| id == INVALID) {
        Some(offset) => Err(offset),
        None => Ok(ids),
    }
}

/// Ids → text. BOS and the padding ids are dropped (they are not characters), so the result
/// holds only vocabulary characters whatever the ids.
pub fn decode(ids: &[u8]) -> String {
    ids.iter()
        .filter_map(|&i| CHARS.get(i as usize).map(|&c| c as char))
        .collect()
}

/// Describes the character starting at `bytes[0]` for an error message: `'a'`,
/// `'\r' (U+000D)`, `'\0' (U+0000)`, `'é' (U+00E9)`, `'\u{feff}' (U+FEFF)` for invisible ones, or
/// `byte 0xFF (not UTF-8)`.
pub fn describe_invalid(bytes: &[u8]) -> String {
    let len = match bytes.first() {
        None => return "the end of the input".to_string(),
        Some(b) if *b < 0x80 => 1,
        Some(b) if b >> 5 == 0b110 => 2,
        Some(b) if b >> 4 == 0b1110 => 3,
        Some(b) if b >> 3 == 0b11110 => 4,
        Some(_) => 0,
    };
    let c = bytes
        .get(..len)
        .and_then(|s| std::str::from_utf8(s).ok())
        .and_then(|s| s.chars().next());
    match c {
        Some(c) if c.is_ascii_graphic() => format!("'{c}'"),
        Some(c) if is_invisible(c) => format!("'{}' (U+{:04X})", escape(c), c as u32),
        Some(c) => format!("'{c}' (U+{:04X})", c as u32),
        None => format!("byte 0x{:02X} (not UTF-8)", bytes[0]),
    }
}

/// Characters a terminal would not show legibly: controls, spaces, zero-width and direction marks,
/// the byte-order mark.
fn is_invisible(c: char) -> bool {
    c.is_control()
        || c.is_whitespace()
        || matches!(c, '\u{00AD}' | '\u{200B}'..='\u{200F}' | '\u{2060}'..='\u{2064}' | '\u{FEFF}')
}

fn escape(c: char) -> String {
    match c {
        '\0' => "\\0".to_string(),
        '\t' => "\\t".to_string(),
        '\r' => "\\r".to_string(),
        '\n' => "\\n".to_string(),
        ' ' => " ".to_string(),
        c => format!("\\u{{{:x}}}", c as u32),
    }
}

/// A prompt's ids; a character outside the vocabulary is a user error naming its position.
pub fn encode_prompt(text: &str) -> anyhow::Result<Vec<i64>> {
    match encode(text.as_bytes()) {
        Ok(ids) => Ok(ids.into_iter().map(i64::from).collect()),
        Err(offset) => user_bail!(
            "the prompt has {} at character {}; allowed: {ALLOWED}; remove or replace it",
            describe_invalid(&text.as_bytes()[offset..]),
            text[..offset].chars().count() + 1
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_matches_the_specification() {
        let want = [
            ('0', 0),
            ('1', 1),
            ('5', 5),
            ('9', 9),
            ('+', 10),
            ('-', 11),
            ('H', 12),
            ('B', 13),
            ('L', 14),
            ('.', 15),
            ('\n', 16),
        ];
        for (c, id) in want {
            assert_eq!(id_of(c as u8), Some(id), "{c:?}");
        }
        assert_eq!(id_of(b'\n'), Some(NEWLINE));
        let valid: Vec<u8> = (0..=255u8).filter(|&b| id_of(b).is_some()).collect();
        assert_eq!(valid.len(), 17);
        for (id, &c) in CHARS.iter().enumerate() {
            assert_eq!(TABLE[c as usize] as usize, id);
        }
        for b in [
            b'\r', b'a', b'h', b'b', b'l', b' ', 0u8, b'=', b'*', b'/', b',', 0xC3, 0xFF,
        ] {
            assert_eq!(id_of(b), None, "{b}");
        }
        assert_eq!(BOS as usize, CHARS.len(), "BOS follows the characters");
    }

    #[test]
    fn round_trip_and_bos_is_not_printed() {
        let text = "0123456789+-HBL.\n123+456\n579\nB101.5-L\n";
        let ids = encode(text.as_bytes()).unwrap();
        assert_eq!(ids.len(), text.len());
        assert_eq!(decode(&ids), text);
        assert_eq!(decode(&[BOS, 1, 20, 2, 31, NEWLINE]), "12\n");
        assert_eq!(encode(b"12a4"), Err(2));
        assert_eq!(encode(b""), Ok(vec![]));
    }

    #[test]
    fn invalid_characters_are_described_escaped() {
        assert_eq!(describe_invalid(b"\rx"), "'\\r' (U+000D)");
        assert_eq!(describe_invalid(b"\0"), "'\\0' (U+0000)");
        assert_eq!(describe_invalid(b"\t"), "'\\t' (U+0009)");
        assert_eq!(describe_invalid(b" 1"), "' ' (U+0020)");
        assert_eq!(describe_invalid(b"a"), "'a'");
        assert_eq!(describe_invalid("é!".as_bytes()), "'é' (U+00E9)");
        assert_eq!(describe_invalid("😀".as_bytes()), "'😀' (U+1F600)");
        assert_eq!(
            describe_invalid("\u{feff}1".as_bytes()),
            "'\\u{feff}' (U+FEFF)"
        );
        assert_eq!(describe_invalid(&[0xFF, 0x41]), "byte 0xFF (not UTF-8)");
        assert_eq!(describe_invalid(&[0xC3, 0x28]), "byte 0xC3 (not UTF-8)");
        assert_eq!(describe_invalid(&[0xE2, 0x82]), "byte 0xE2 (not UTF-8)");
    }

    #[test]
    fn prompt_errors_name_the_position() {
        assert_eq!(encode_prompt("1+2").unwrap(), vec![1, 10, 2]);
        let err = encode_prompt("12é+x").unwrap_err();
        assert_eq!(crate::sys::error::exit_code(&err), 2);
        assert!(
            err.to_string().contains("'é' (U+00E9) at character 3"),
            "{err}"
        );
        let err = encode_prompt("1+2\r\n").unwrap_err();
        assert!(
            err.to_string().contains("'\\r' (U+000D) at character 4"),
            "{err}"
        );
    }
}
