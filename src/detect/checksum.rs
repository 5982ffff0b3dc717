//! The check digits and validity rules the detectors confirm a candidate with. Each is a
//! few lines of arithmetic over the published rule (no maintained crate covered all four
//! with less code than the unit tests below), and each is tested on published examples.

/// Luhn (ISO/IEC 7812-1) over the ASCII digits of `digits`: true when the sum is 0 mod 10.
pub fn luhn(digits: &[u8]) -> bool {
    let mut sum = 0u32;
    for (i, d) in digits.iter().rev().enumerate() {
        let mut v = u32::from(d - b'0');
        if i % 2 == 1 {
            v *= 2;
            if v > 9 {
                v -= 9;
            }
        }
        sum += v;
    }
    !digits.is_empty() && sum.is_multiple_of(10)
}

/// IBAN check (ISO 13616): the first four characters moved to the end, letters as
/// 10..35, the number mod 97 is 1. `iban` is upper-case letters and digits, no spaces.
pub fn iban_mod97(iban: &[u8]) -> bool {
    if iban.len() < 5 {
        return false;
    }
    let mut rem = 0u32;
    for &c in iban[4..].iter().chain(&iban[..4]) {
        match c {
            b'0'..=b'9' => rem = (rem * 10 + u32::from(c - b'0')) % 97,
            b'A'..=b'Z' => rem = (rem * 100 + u32::from(c - b'A' + 10)) % 97,
            _ => return false,
        }
    }
    rem == 1
}

/// Length of a country's IBAN, for the countries whose IBANs the detector knows; other
/// countries take any length from 15 to 34.
pub fn iban_length(country: &[u8]) -> Option<usize> {
    Some(match country {
        b"AT" | b"EE" | b"KZ" | b"LT" | b"LU" | b"XK" => 20,
        b"BE" => 16,
        b"BG" | b"BH" | b"CR" | b"GB" | b"GE" | b"IE" | b"ME" | b"RS" | b"DE" => 22,
        b"CH" | b"HR" | b"LI" | b"LV" => 21,
        b"CY" | b"HU" | b"PL" => 28,
        b"CZ" | b"ES" | b"MD" | b"PK" | b"RO" | b"SA" | b"SE" | b"SK" | b"TN" | b"VG" => 24,
        b"DK" | b"FI" | b"FO" | b"GL" | b"NL" => 18,
        b"FR" | b"GR" | b"IT" | b"MC" | b"SM" => 27,
        b"IS" | b"TR" => 26,
        b"NO" => 15,
        b"PT" => 25,
        b"SI" => 19,
        b"AE" | b"IL" => 23,
        _ => return None,
    })
}

/// GB 11643-1999 check character of a Chinese resident identity number: the first 17
/// digits weighted 2^(17-i) mod 11, the remainder mapped to `10X98765432`.
pub fn gb11643(id: &[u8]) -> bool {
    const WEIGHTS: [u32; 17] = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2];
    const CHECK: &[u8; 11] = b"10X98765432";
    if id.len() != 18 || !id[..17].iter().all(u8::is_ascii_digit) {
        return false;
    }
    let sum: u32 = id[..17]
        .iter()
        .zip(WEIGHTS)
        .map(|(d, w)| u32::from(d - b'0') * w)
        .sum();
    CHECK[(sum % 11) as usize] == id[17].to_ascii_uppercase()
}

/// Province-level codes (the first two digits) of GB/T 2260.
pub fn cn_region(code: &[u8]) -> bool {
    matches!(
        code,
        b"11"
            | b"12"
            | b"13"
            | b"14"
            | b"15"
            | b"21"
            | b"22"
            | b"23"
            | b"31"
            | b"32"
            | b"33"
            | b"34"
            | b"35"
            | b"36"
            | b"37"
            | b"41"
            | b"42"
            | b"43"
            | b"44"
            | b"45"
            | b"46"
            | b"50"
            | b"51"
            | b"52"
            | b"53"
            | b"54"
            | b"61"
            | b"62"
            | b"63"
            | b"64"
            | b"65"
            | b"71"
            | b"81"
            | b"82"
            | b"91"
    )
}

/// A birth date `YYYYMMDD` from 1900 to 2099 that exists on the calendar.
pub fn plausible_date(d: &[u8]) -> bool {
    if d.len() != 8 || !d.iter().all(u8::is_ascii_digit) {
        return false;
    }
    let n = |s: &[u8]| s.iter().fold(0u32, |a, c| a * 10 + u32::from(c - b'0'));
    let (y, m, day) = (n(&d[..4]), n(&d[4..6]), n(&d[6..]));
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let days = match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return false,
    };
    (1900..=2099).contains(&y) && (1..=days).contains(&day)
}

/// A US social security number that can have been issued: area not 000, 666 or 900-999,
/// group not 00, serial not 0000 (the SSA's rules since 2011 randomisation).
pub fn ssn_valid(area: &[u8], group: &[u8], serial: &[u8]) -> bool {
    area != b"000" && area != b"666" && area[0] != b'9' && group != b"00" && serial != b"0000"
}

/// Whether `digits` (13-19 ASCII digits) starts like a number of a card scheme of that
/// length: Visa, Mastercard, American Express, Discover, UnionPay, JCB, Diners Club.
pub fn card_prefix(digits: &[u8]) -> bool {
    let len = digits.len();
    let p = |n: usize| {
        digits[..n]
            .iter()
            .fold(0u32, |a, c| a * 10 + u32::from(c - b'0'))
    };
    match digits[0] {
        b'4' => matches!(len, 13 | 16 | 19),
        b'5' => len == 16 && (51..=55).contains(&p(2)),
        b'2' => len == 16 && (2221..=2720).contains(&p(4)),
        b'3' => match p(2) {
            34 | 37 => len == 15,
            35 => (16..=19).contains(&len) && (3528..=3589).contains(&p(4)),
            36 | 38 | 39 => (14..=19).contains(&len),
            30 => (14..=19).contains(&len) && (300..=305).contains(&p(3)),
            _ => false,
        },
        b'6' => {
            (16..=19).contains(&len)
                && (p(4) == 6011 || p(2) == 65 || p(2) == 62 || (644..=649).contains(&p(3)))
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn luhn_on_published_numbers() {
        assert!(luhn(b"4111111111111111"));
        assert!(luhn(b"79927398713"));
        assert!(!luhn(b"79927398710"));
        assert!(!luhn(b"4111111111111112"));
        assert!(!luhn(b""));
    }

    #[test]
    fn iban_examples() {
        assert!(iban_mod97(b"GB82WEST12345698765432"));
        assert!(iban_mod97(b"DE89370400440532013000"));
        assert!(iban_mod97(b"FR1420041010050500013M02606"));
        assert!(!iban_mod97(b"GB82WEST12345698765433"));
        assert_eq!(iban_length(b"GB"), Some(22));
    }

    #[test]
    fn gb11643_examples() {
        assert!(gb11643(b"11010519491231002X"));
        assert!(gb11643(b"440524188001010014"));
        assert!(!gb11643(b"110105194912310021"));
        assert!(plausible_date(b"19491231"));
        assert!(plausible_date(b"20000229"));
        assert!(!plausible_date(b"19000229"));
        assert!(!plausible_date(b"19491331"));
        assert!(cn_region(b"44") && !cn_region(b"99"));
    }

    #[test]
    fn ssn_rules() {
        assert!(ssn_valid(b"123", b"45", b"6789"));
        assert!(!ssn_valid(b"000", b"45", b"6789"));
        assert!(!ssn_valid(b"666", b"45", b"6789"));
        assert!(!ssn_valid(b"912", b"45", b"6789"));
        assert!(!ssn_valid(b"123", b"00", b"6789"));
        assert!(!ssn_valid(b"123", b"45", b"0000"));
    }

    #[test]
    fn card_schemes() {
        assert!(card_prefix(b"4111111111111111"));
        assert!(card_prefix(b"5555555555554444"));
        assert!(card_prefix(b"2223003122003222"));
        assert!(card_prefix(b"378282246310005"));
        assert!(card_prefix(b"6011111111111117"));
        assert!(card_prefix(b"6200000000000005"));
        assert!(card_prefix(b"3530111333300000"));
        assert!(card_prefix(b"30569309025904"));
        assert!(!card_prefix(b"9783161484100"), "an ISBN");
        assert!(!card_prefix(b"1234567812345670"));
    }
}
