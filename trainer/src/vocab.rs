//! The fixed character vocabulary: `0`..`9` → 0..9, `+` 10, `-` 11, `H` 12, `B` 13, `L` 14, `.` 15,
//! newline 16, `<|bos|>` 17, and ids 18..31 unused padding (a vocabulary of 32 keeps matrix shapes
//! multiples of 32).

use crate::user_bail;

pub const VOCAB_SIZE: usize = 32;
/// Starts every document; never printed.
pub const BOS: u8 = 17;
/// The characters, in id order.
pub const CHARS: &[u8; 17] = b"0123456789+-HBL.\n";
/// What users read in error messages.
pub const ALLOWED: &str = "0-9 + - H B L . and newline";

const INVALID: u8 = u8::MAX;

/// Byte → id, `INVALID` for bytes outside the vocabulary.
const TABLE: [u8; 256] = {
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

/// Ids → text; BOS and padding ids are skipped (they are not characters).
pub fn decode(ids: &[u8]) -> String {
    ids.iter()
        .filter_map(|&i| CHARS.get(i as usize).map(|&c| c as char))
        .collect()
}

/// Describes the character starting at `bytes[0]` for an error message: `'a'`, `'\r' (U+000D)`,
/// `'é' (U+00E9)`, or `byte 0xFF (not UTF-8)`.
pub fn describe_invalid(bytes: &[u8]) -> String {
    let len = match bytes.first() {
        None => return "end of input".to_string(),
        Some(b) if *b < 0x80 => 1,
        Some(b) if b >> 5 == 0b110 => 2,
        Some(b) if b >> 4 == 0b1110 => 3,
        Some(b) if b >> 3 == 0b11110 => 4,
        Some(_) => 0,
    };
    match bytes
        .get(..len)
        .and_then(|s| std::str::from_utf8(s).ok())
        .and_then(|s| s.chars().next())
    {
        Some(c) if c.is_ascii_graphic() || c == ' ' => format!("'{c}'"),
        Some(c) if c.is_control() => format!("'{}' (U+{:04X})", c.escape_default(), c as u32),
        Some(c) => format!("'{c}' (U+{:04X})", c as u32),
        None => format!("byte 0x{:02X} (not UTF-8)", bytes[0]),
    }
}

/// A prompt's ids; a character outside the vocabulary is a user error naming its position.
pub fn encode_prompt(text: &str) -> anyhow::Result<Vec<i64>> {
    let mut ids = Vec::with_capacity(text.len());
    for (column, (offset, _)) in text.char_indices().enumerate() {
        match id_of(text.as_bytes()[offset]) {
            Some(id) if text.as_bytes()[offset] < 0x80 => ids.push(id as i64),
            _ => user_bail!(
                "the prompt has {} at character {}; allowed: {ALLOWED}",
                describe_invalid(&text.as_bytes()[offset..]),
                column + 1
            ),
        }
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_matches_the_specification() {
        let want = [
            ('0', 0),
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
        let valid = (0..=255u8).filter(|&b| id_of(b).is_some()).count();
        assert_eq!(valid, 17);
        for b in [b'\r', b'a', b'h', b' ', 0u8, b'=', 0xC3] {
            assert_eq!(id_of(b), None, "{b}");
        }
    }

    #[test]
    fn round_trip_and_bos_is_not_printed() {
        let text = "123+456\n579\nB101.5-L\n";
        let ids: Vec<u8> = text.bytes().map(|b| id_of(b).unwrap()).collect();
        assert_eq!(decode(&ids), text);
        assert_eq!(decode(&[BOS, 1, 20, 2]), "12");
    }

    #[test]
    fn invalid_characters_are_described_escaped() {
        assert_eq!(describe_invalid(b"\rx"), "'\\r' (U+000D)");
        assert_eq!(describe_invalid(b"\0"), "'\\u{0}' (U+0000)");
        assert_eq!(describe_invalid(b"a"), "'a'");
        assert_eq!(describe_invalid("é!".as_bytes()), "'é' (U+00E9)");
        assert_eq!(describe_invalid(&[0xFF, 0x41]), "byte 0xFF (not UTF-8)");
    }

    #[test]
    fn prompt_errors_name_the_position() {
        assert_eq!(encode_prompt("1+2").unwrap(), vec![1, 10, 2]);
        let err = encode_prompt("12é+x").unwrap_err();
        assert_eq!(crate::error::exit_code(&err), 2);
        assert!(
            err.to_string().contains("'é' (U+00E9) at character 3"),
            "{err}"
        );
    }
}
