//! The built-in detectors: a regular expression finds candidates, then code confirms them
//! (a checksum, a valid range, a plausible date, its neighbours). The expressions avoid
//! `\b`: the `regex` crate's word boundary is Unicode-aware, so it sees none between `号`
//! and `1` in `身份证号110105...`; edges are checked on ASCII letters and digits instead.

use std::net::Ipv6Addr;
use std::sync::LazyLock;

use regex::Regex;

use super::checksum;
use super::Hit;

/// A built-in detector. The order of [`Builtin::ALL`] is the priority when two find the
/// same span (a Chinese identity number that is also Luhn-valid is an identity number).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Builtin {
    PrivateKey,
    Jwt,
    AnthropicKey,
    ApiKey,
    GithubToken,
    AwsKey,
    Password,
    Email,
    CnId,
    Iban,
    Card,
    Ssn,
    CnMobile,
    Phone,
    Ipv6,
    Ipv4,
}

impl Builtin {
    pub const ALL: [Builtin; 16] = [
        Builtin::PrivateKey,
        Builtin::Jwt,
        Builtin::AnthropicKey,
        Builtin::ApiKey,
        Builtin::GithubToken,
        Builtin::AwsKey,
        Builtin::Password,
        Builtin::Email,
        Builtin::CnId,
        Builtin::Iban,
        Builtin::Card,
        Builtin::Ssn,
        Builtin::CnMobile,
        Builtin::Phone,
        Builtin::Ipv6,
        Builtin::Ipv4,
    ];

    /// The name a constitution uses (`detectors = ["email", ...]`).
    pub fn name(self) -> &'static str {
        match self {
            Builtin::PrivateKey => "private_key",
            Builtin::Jwt => "jwt",
            Builtin::AnthropicKey => "anthropic_key",
            Builtin::ApiKey => "api_key",
            Builtin::GithubToken => "github_token",
            Builtin::AwsKey => "aws_key",
            Builtin::Password => "password",
            Builtin::Email => "email",
            Builtin::CnId => "cn_id",
            Builtin::Iban => "iban",
            Builtin::Card => "card",
            Builtin::Ssn => "ssn",
            Builtin::CnMobile => "cn_mobile",
            Builtin::Phone => "phone",
            Builtin::Ipv6 => "ipv6",
            Builtin::Ipv4 => "ipv4",
        }
    }

    /// The label a masked span gets (`[CARD]`).
    pub fn kind(self) -> &'static str {
        match self {
            Builtin::PrivateKey => "PRIVATE_KEY",
            Builtin::Jwt => "JWT",
            Builtin::AnthropicKey | Builtin::ApiKey => "API_KEY",
            Builtin::GithubToken => "GITHUB_TOKEN",
            Builtin::AwsKey => "AWS_KEY",
            Builtin::Password => "PASSWORD",
            Builtin::Email => "EMAIL",
            Builtin::CnId => "CN_ID",
            Builtin::Iban => "IBAN",
            Builtin::Card => "CARD",
            Builtin::Ssn => "SSN",
            Builtin::CnMobile | Builtin::Phone => "PHONE",
            Builtin::Ipv6 | Builtin::Ipv4 => "IP",
        }
    }

    pub fn from_name(name: &str) -> Option<Builtin> {
        Builtin::ALL.into_iter().find(|b| b.name() == name)
    }

    /// Whether the detector finds personal data (else a secret).
    pub fn personal(self) -> bool {
        !matches!(
            self,
            Builtin::PrivateKey
                | Builtin::Jwt
                | Builtin::AnthropicKey
                | Builtin::ApiKey
                | Builtin::GithubToken
                | Builtin::AwsKey
                | Builtin::Password
        )
    }

    /// Appends this detector's hits in `text` (byte spans).
    pub fn find(self, text: &str, out: &mut Vec<Hit>) {
        let re = &REGEXES[self as usize];
        let mut push = |start: usize, end: usize| {
            out.push(Hit {
                detector: self.name().into(),
                kind: self.kind().into(),
                start,
                end,
            })
        };
        for caps in re.captures_iter(text) {
            // The first group that took part is the identifier; the match may also hold
            // the character (or keyword) before it.
            let Some(m) = caps.iter().skip(1).flatten().next() else {
                continue;
            };
            let (start, mut end) = (m.start(), m.end());
            let s = m.as_str();
            let ok = match self {
                Builtin::PrivateKey | Builtin::Jwt => true,
                Builtin::AnthropicKey | Builtin::GithubToken | Builtin::AwsKey => {
                    edge_after(text, end, is_token_char)
                }
                Builtin::ApiKey => {
                    edge_after(text, end, is_token_char)
                        && !s.starts_with("sk-ant-")
                        && s.bytes().skip(3).any(|c| c.is_ascii_digit())
                        && s.bytes().skip(3).any(|c| c.is_ascii_alphabetic())
                }
                Builtin::Password => {
                    // A full stop after the value, or the bracket of an enclosing aside
                    // ("(using password: YES)"), is not the password.
                    end = start + trim_closing(s).len();
                    password_value(&text[start..end], caps.get(0).map_or("", |m| m.as_str()))
                }
                Builtin::Email => true,
                Builtin::CnId => {
                    let b = s.as_bytes();
                    edge_after(text, end, |c| c.is_ascii_alphanumeric())
                        && checksum::cn_region(&b[..2])
                        && checksum::plausible_date(&b[6..14])
                        && checksum::gb11643(b)
                }
                Builtin::Iban => iban(s),
                Builtin::Card => {
                    // The expression is greedy and may run on into a following number
                    // ("... 1111 2024"): try each end after a digit group, longest first.
                    let card = |e: usize| {
                        let digits = digits_of(&text[start..e]);
                        edge_after(text, e, |c| c.is_ascii_alphanumeric())
                            && (13..=19).contains(&digits.len())
                            && checksum::card_prefix(&digits)
                            && checksum::luhn(&digits)
                    };
                    match (start + 1..=end).rev().find(|&e| card(e)) {
                        Some(e) => {
                            end = e;
                            true
                        }
                        None => false,
                    }
                }
                Builtin::Ssn => {
                    let d = digits_of(s);
                    edge_after(text, end, |c| c.is_ascii_alphanumeric() || c == '-')
                        && checksum::ssn_valid(&d[..3], &d[3..5], &d[5..])
                }
                Builtin::CnMobile => edge_after(text, end, |c| c.is_ascii_alphanumeric()),
                Builtin::Phone => {
                    // A closing parenthesis that opens nowhere in the number is the
                    // sentence's: "(+44 20 7946 0958)".
                    if s.ends_with(')') && s.matches(')').count() > s.matches('(').count() {
                        end -= 1;
                    }
                    let s = &text[start..end];
                    let n = digits_of(s).len();
                    edge_after(text, end, |c| c.is_ascii_alphanumeric() || c == '-')
                        && !after_digit_group(text, start)
                        && if s.starts_with('+') {
                            (8..=15).contains(&n)
                        } else {
                            (7..=12).contains(&n)
                        }
                }
                Builtin::Ipv6 => {
                    edge_after(text, end, |c| c.is_ascii_alphanumeric() || c == ':') && ipv6(s)
                }
                Builtin::Ipv4 => {
                    // Not part of a longer dotted number (a version string 1.2.3.4.5).
                    let rest = &text[end..];
                    let after_ok = match rest.strip_prefix('.') {
                        Some(r) => !r.starts_with(|c: char| c.is_ascii_digit()),
                        None => edge_after(text, end, |c| c.is_ascii_alphanumeric()),
                    };
                    after_ok
                        && s.split('.').all(|p| {
                            p.parse::<u16>().is_ok_and(|v| v <= 255)
                                && (p.len() == 1 || !p.starts_with('0'))
                        })
                }
            };
            if ok {
                push(start, end);
            }
        }
    }
}

/// Characters of an API key or token.
fn is_token_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '-'
}

/// True when the character at byte `end` (if any) does not continue the identifier.
fn edge_after(text: &str, end: usize, continues: impl Fn(char) -> bool) -> bool {
    text[end..].chars().next().is_none_or(|c| !continues(c))
}

/// Whether the text before byte `start` ends with a digit and one separator: the
/// candidate is the tail of a longer number (a card's or an IBAN's groups), not a phone.
fn after_digit_group(text: &str, start: usize) -> bool {
    let mut before = text[..start].chars().rev();
    matches!(before.next(), Some(' ' | '-' | '.'))
        && before.next().is_some_and(|c| c.is_ascii_digit())
}

fn digits_of(s: &str) -> Vec<u8> {
    s.bytes().filter(u8::is_ascii_digit).collect()
}

fn iban(s: &str) -> bool {
    let compact: Vec<u8> = s.bytes().filter(|c| *c != b' ').collect();
    let len_ok = match checksum::iban_length(&compact[..2]) {
        Some(n) => compact.len() == n,
        None => (15..=34).contains(&compact.len()),
    };
    len_ok && checksum::iban_mod97(&compact)
}

fn ipv6(s: &str) -> bool {
    if s.parse::<Ipv6Addr>().is_err() {
        return false;
    }
    // `a::b` in code is a path, not an address: a compressed address must hold a digit,
    // and one without `::` has all eight groups.
    let groups = s.split(':').filter(|g| !g.is_empty()).count();
    s.bytes().any(|c| c.is_ascii_digit()) && ((s.contains("::") && groups >= 1) || groups == 8)
}

/// `value` without trailing full stops and closing brackets that close nothing inside it
/// (`!` and `?` stay: they end many real passwords).
fn trim_closing(value: &str) -> &str {
    let mut v = value;
    loop {
        let trimmed = v.trim_end_matches('.');
        let unmatched = |close: char, open: char| {
            trimmed.ends_with(close)
                && trimmed.matches(open).count() < trimmed.matches(close).count()
        };
        let next = if unmatched(')', '(') || unmatched(']', '[') || unmatched('}', '{') {
            &trimmed[..trimmed.len() - 1]
        } else {
            trimmed
        };
        if next.len() == v.len() {
            return v;
        }
        v = next;
    }
}

/// A password-style value: not a placeholder (`****`, `<password>`, `${PASS}`, `xxxx`),
/// and, unless assigned with `=` as in code or configuration, holding a digit or a symbol
/// (so prose such as "Password: must be long" is not one).
fn password_value(value: &str, whole: &str) -> bool {
    let first = value.chars().next().unwrap_or(' ');
    let all_same = value.chars().all(|c| c == first);
    let assigned = whole.contains('=');
    let secret_like = value.chars().any(|c| !c.is_ascii_alphabetic());
    !all_same
        && !matches!(first, '<' | '$' | '{' | '%' | '[' | '(')
        && !value.eq_ignore_ascii_case("null")
        && (assigned || secret_like)
}

/// One expression per detector, in [`Builtin::ALL`] order. Compiled once: they are
/// constants of the program, like the tables above.
static REGEXES: LazyLock<Vec<Regex>> = LazyLock::new(|| {
    // Not preceded by an ASCII letter or digit (or the given extra characters).
    const EDGE: &str = r"(?:^|[^0-9A-Za-z])";
    let patterns: [String; 16] = [
        // PrivateKey: the whole block; an unterminated one to the end of the text.
        r"(-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----(?s:.*?)(?:-----END [A-Z0-9 ]*PRIVATE KEY-----|\z))".into(),
        // Jwt: header.payload.signature, the header a base64url JSON object.
        format!(r"{EDGE}(eyJ[A-Za-z0-9_-]{{8,}}\.[A-Za-z0-9_-]{{8,}}\.[A-Za-z0-9_-]{{8,}})"),
        r"(?:^|[^0-9A-Za-z_-])(sk-ant-[A-Za-z0-9_-]{20,})".into(),
        r"(?:^|[^0-9A-Za-z_-])(sk-[A-Za-z0-9_-]{20,})".into(),
        r"(?:^|[^0-9A-Za-z_])((?:gh[pousr]_[A-Za-z0-9]{36,251}|github_pat_[A-Za-z0-9_]{22,242}))".into(),
        format!(r"{EDGE}((?:AKIA|ASIA|ABIA|ACCA|A3T[A-Z0-9])[A-Z0-9]{{16}})"),
        // Password: the value of a `password = ...` assignment (the key stays readable).
        r#"(?i)(?:^|[^0-9A-Za-z])(?:[a-z0-9]+[_-])*(?:password|passwd|passphrase|secret|client_secret|secret_key|api_key|apikey|access_token|auth_token|密码|口令)["']?\s*(?:[:=：]|是|为)\s*["']?([!-~&&[^"',;`]]{4,})"#.into(),
        r"(?:^|[^0-9A-Za-z._%+-])([A-Za-z0-9][A-Za-z0-9._%+-]{0,63}@[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}[A-Za-z0-9])?)*\.[A-Za-z]{2,24})".into(),
        format!(r"{EDGE}([1-9][0-9]{{16}}[0-9Xx])"),
        format!(r"{EDGE}([A-Z]{{2}}[0-9]{{2}}(?: ?[A-Z0-9]{{4}}){{2,7}}(?: ?[A-Z0-9]{{1,3}})?)"),
        format!(r"{EDGE}([2-6][0-9]{{3}}(?:[ -]?[0-9]){{9,15}})"),
        r"(?:^|[^0-9A-Za-z-])([0-9]{3}-[0-9]{2}-[0-9]{4}|[0-9]{3} [0-9]{2} [0-9]{4})".into(),
        r"(?:^|[^0-9A-Za-z+])((?:\+?86[ -]?)?1[3-9][0-9](?:[0-9]{8}|[ -][0-9]{4}[ -][0-9]{4}))".into(),
        // Phone: E.164 with or without separators; North American (NXX) NXX-XXXX; a
        // national number with a trunk 0 and separated groups (UK, DE, FR, CN landlines).
        // A bare local number (555-0142) only after a word that says it is a phone's.
        format!(
            r"(?:^|[^0-9A-Za-z+-])({}|{}|{}|{})|(?i:phone|tel|call|mobile|cell|fax|电话|手机|致电)[^0-9\n]{{0,12}}([2-9][0-9]{{2}}-[0-9]{{4}})",
            r"\+[1-9][0-9]{0,3}(?:[ .-]?\(?[0-9]{1,4}\)?){2,6}",
            r"(?:\(\s?[2-9][0-9]{2}\s?\)\s?|[2-9][0-9]{2}[ .-])[2-9][0-9]{2}[ .-][0-9]{4}",
            r"0[1-9][0-9]{0,3}[ /-][0-9]{3,8}(?:[ -][0-9]{2,4}){0,3}",
            r"0[1-9](?: [0-9]{2}){4}"
        ),
        // Ipv6: a run of hex groups and colons, confirmed by the standard library's parser.
        r"(?:^|[^0-9A-Za-z:.])((?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4})".into(),
        r"(?:^|[^0-9A-Za-z.])((?:[0-9]{1,3}\.){3}[0-9]{1,3})".into(),
    ];
    patterns
        .iter()
        .map(|p| Regex::new(p).expect("built-in detector patterns compile"))
        .collect()
});
