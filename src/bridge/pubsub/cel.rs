//! The subset of CEL that subscription `match` rules may use, evaluated over the CloudEvent as
//! a JSON object named `event` (the grammar is in `docs/bridge-pubsub.md`):
//!
//! ```text
//! expr    := and ("||" and)*
//! and     := unary ("&&" unary)*
//! unary   := "!" unary | compare
//! compare := term (("==" | "!=" | "<" | "<=" | ">" | ">=") term)?
//! term    := "(" expr ")" | literal | path ("." method "(" string ")")?
//! path    := "event" ("." ident | "[" string "]")*
//! method  := startsWith | endsWith | contains
//! literal := string ('…' or "…") | number | true | false | null
//! ```
//!
//! As in CEL, a path to a missing field is an error, and an error makes the whole rule not
//! match (so the next rule is tried).

use serde_json::Value;

/// A parsed `match` expression.
#[derive(Clone, Debug, PartialEq)]
pub enum Expr {
    Or(Box<Expr>, Box<Expr>),
    And(Box<Expr>, Box<Expr>),
    Not(Box<Expr>),
    Compare(Op, Box<Expr>, Box<Expr>),
    Call(Method, Box<Expr>, String),
    Path(Vec<String>),
    Literal(Value),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    StartsWith,
    EndsWith,
    Contains,
}

#[derive(Clone, Debug, PartialEq)]
enum Token {
    Ident(String),
    Str(String),
    Num(f64),
    Sym(&'static str),
}

fn tokenize(src: &str) -> Result<Vec<(usize, Token)>, String> {
    let b = src.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i] as char;
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        let start = i;
        if c == '"' || c == '\'' {
            let mut s = String::new();
            i += 1;
            loop {
                let Some(&ch) = b.get(i) else {
                    return Err(format!(
                        "unterminated string starting at column {}",
                        start + 1
                    ));
                };
                let ch = ch as char;
                if ch == c {
                    i += 1;
                    break;
                }
                if ch == '\\' {
                    // The escaped character whole: a multi-byte one must not be split.
                    let Some(e) = src[i + 1..].chars().next() else {
                        return Err(format!(
                            "unterminated string starting at column {}",
                            start + 1
                        ));
                    };
                    s.push(match e {
                        'n' => '\n',
                        't' => '\t',
                        other => other,
                    });
                    i += 1 + e.len_utf8();
                    continue;
                }
                // Copy a whole UTF-8 character.
                let len = src[i..].chars().next().map_or(1, char::len_utf8);
                s.push_str(&src[i..i + len]);
                i += len;
            }
            out.push((start, Token::Str(s)));
            continue;
        }
        if c.is_ascii_digit() || (c == '-' && b.get(i + 1).is_some_and(u8::is_ascii_digit)) {
            i += 1;
            while i < b.len() && (b[i].is_ascii_digit() || b[i] == b'.') {
                i += 1;
            }
            let n = src[start..i]
                .parse()
                .map_err(|_| format!("bad number {:?} at column {}", &src[start..i], start + 1))?;
            out.push((start, Token::Num(n)));
            continue;
        }
        if c.is_ascii_alphabetic() || c == '_' {
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                i += 1;
            }
            out.push((start, Token::Ident(src[start..i].to_string())));
            continue;
        }
        let two = src.get(i..i + 2).unwrap_or("");
        let sym: &'static str = match two {
            "==" => "==",
            "!=" => "!=",
            "<=" => "<=",
            ">=" => ">=",
            "&&" => "&&",
            "||" => "||",
            _ => match c {
                '<' => "<",
                '>' => ">",
                '!' => "!",
                '(' => "(",
                ')' => ")",
                '.' => ".",
                '[' => "[",
                ']' => "]",
                _ => return Err(format!("unexpected {c:?} at column {}", i + 1)),
            },
        };
        i += sym.len();
        out.push((start, Token::Sym(sym)));
    }
    Ok(out)
}

/// The deepest nesting of parentheses and `!` a rule may use. The parser, the evaluator and
/// the expression's drop all recurse once per level: an app can send any `match` at run time
/// (`/dapr/subscribe`), and 4,000 nested `(` overflowed a worker thread's stack, aborting the
/// whole sidecar. Real rules nest a handful of levels.
pub const MAX_NESTING: usize = 32;
/// The most tokens a rule may have: a chain of `&&`/`||` nests the tree one level per operand,
/// so this bounds the tree's depth too (a few hundred frames, far from any stack limit).
pub const MAX_TOKENS: usize = 512;

struct Parser {
    tokens: Vec<(usize, Token)>,
    pos: usize,
    len: usize,
    /// Parentheses and `!` open around the current position.
    nesting: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.pos).map(|(_, t)| t)
    }

    fn column(&self) -> usize {
        self.tokens.get(self.pos).map_or(self.len, |(c, _)| *c) + 1
    }

    fn eat(&mut self, sym: &str) -> bool {
        if matches!(self.peek(), Some(Token::Sym(s)) if *s == sym) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn expect(&mut self, sym: &str) -> Result<(), String> {
        if self.eat(sym) {
            Ok(())
        } else {
            Err(format!(
                "expected {sym:?} at column {}, found {}",
                self.column(),
                self.found()
            ))
        }
    }

    fn found(&self) -> String {
        match self.peek() {
            None => "the end".to_string(),
            Some(Token::Ident(s)) => format!("{s:?}"),
            Some(Token::Str(s)) => format!("string {s:?}"),
            Some(Token::Num(n)) => format!("number {n}"),
            Some(Token::Sym(s)) => format!("{s:?}"),
        }
    }

    fn or(&mut self) -> Result<Expr, String> {
        let mut left = self.and()?;
        while self.eat("||") {
            left = Expr::Or(Box::new(left), Box::new(self.and()?));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Expr, String> {
        let mut left = self.unary()?;
        while self.eat("&&") {
            left = Expr::And(Box::new(left), Box::new(self.unary()?));
        }
        Ok(left)
    }

    fn unary(&mut self) -> Result<Expr, String> {
        let column = self.column();
        if self.eat("!") {
            self.enter(column)?;
            let e = Expr::Not(Box::new(self.unary()?));
            self.nesting -= 1;
            return Ok(e);
        }
        self.compare()
    }

    /// One more level of nesting, refused past [`MAX_NESTING`].
    fn enter(&mut self, column: usize) -> Result<(), String> {
        self.nesting += 1;
        if self.nesting > MAX_NESTING {
            return Err(format!(
                "expected at most {MAX_NESTING} levels of parentheses and `!`, found more at column {column}"
            ));
        }
        Ok(())
    }

    fn compare(&mut self) -> Result<Expr, String> {
        let left = self.term()?;
        let op = match self.peek() {
            Some(Token::Sym("==")) => Op::Eq,
            Some(Token::Sym("!=")) => Op::Ne,
            Some(Token::Sym("<")) => Op::Lt,
            Some(Token::Sym("<=")) => Op::Le,
            Some(Token::Sym(">")) => Op::Gt,
            Some(Token::Sym(">=")) => Op::Ge,
            _ => return Ok(left),
        };
        self.pos += 1;
        let right = self.term()?;
        Ok(Expr::Compare(op, Box::new(left), Box::new(right)))
    }

    fn term(&mut self) -> Result<Expr, String> {
        let column = self.column();
        match self.peek().cloned() {
            Some(Token::Sym("(")) => {
                self.pos += 1;
                self.enter(column)?;
                let e = self.or()?;
                self.expect(")")?;
                self.nesting -= 1;
                Ok(e)
            }
            Some(Token::Str(s)) => {
                self.pos += 1;
                Ok(Expr::Literal(Value::String(s)))
            }
            Some(Token::Num(n)) => {
                self.pos += 1;
                Ok(Expr::Literal(serde_json::json!(n)))
            }
            Some(Token::Ident(id)) => {
                self.pos += 1;
                match id.as_str() {
                    "true" => return Ok(Expr::Literal(Value::Bool(true))),
                    "false" => return Ok(Expr::Literal(Value::Bool(false))),
                    "null" => return Ok(Expr::Literal(Value::Null)),
                    "event" => {}
                    other => {
                        return Err(format!(
                            "expected `event`, a literal or \"(\" at column {column}, found {other:?}"
                        ));
                    }
                }
                let mut path = Vec::new();
                loop {
                    if self.eat("[") {
                        match self.peek().cloned() {
                            Some(Token::Str(s)) => {
                                self.pos += 1;
                                path.push(s);
                            }
                            _ => {
                                return Err(format!(
                                    "expected a string index at column {}, found {}",
                                    self.column(),
                                    self.found()
                                ));
                            }
                        }
                        self.expect("]")?;
                    } else if self.eat(".") {
                        let name = match self.peek().cloned() {
                            Some(Token::Ident(n)) => n,
                            _ => {
                                return Err(format!(
                                    "expected a field name at column {}, found {}",
                                    self.column(),
                                    self.found()
                                ));
                            }
                        };
                        self.pos += 1;
                        if matches!(self.peek(), Some(Token::Sym("("))) {
                            let method = match name.as_str() {
                                "startsWith" => Method::StartsWith,
                                "endsWith" => Method::EndsWith,
                                "contains" => Method::Contains,
                                other => {
                                    return Err(format!(
                                        "unsupported function {other:?}; expected startsWith, endsWith or contains"
                                    ));
                                }
                            };
                            self.pos += 1;
                            let arg = match self.peek().cloned() {
                                Some(Token::Str(s)) => s,
                                _ => {
                                    return Err(format!(
                                        "expected a string argument at column {}, found {}",
                                        self.column(),
                                        self.found()
                                    ));
                                }
                            };
                            self.pos += 1;
                            self.expect(")")?;
                            return Ok(Expr::Call(method, Box::new(Expr::Path(path)), arg));
                        }
                        path.push(name);
                    } else {
                        return Ok(Expr::Path(path));
                    }
                }
            }
            _ => Err(format!(
                "expected `event`, a literal or \"(\" at column {column}, found {}",
                self.found()
            )),
        }
    }
}

/// Parses a `match` expression; the error says what was expected, where and what was found.
pub fn parse(src: &str) -> Result<Expr, String> {
    let tokens = tokenize(src)?;
    if tokens.len() > MAX_TOKENS {
        return Err(format!(
            "expected an expression of at most {MAX_TOKENS} tokens, found {}",
            tokens.len()
        ));
    }
    let mut p = Parser {
        tokens,
        pos: 0,
        len: src.len(),
        nesting: 0,
    };
    let e = p.or()?;
    if p.pos != p.tokens.len() {
        return Err(format!(
            "expected the end of the expression at column {}, found {}",
            p.column(),
            p.found()
        ));
    }
    Ok(e)
}

/// Evaluation failed (missing field, mismatched types): the rule does not match.
struct EvalError;

fn value<'a>(e: &'a Expr, event: &'a Value) -> Result<std::borrow::Cow<'a, Value>, EvalError> {
    use std::borrow::Cow;
    match e {
        Expr::Literal(v) => Ok(Cow::Borrowed(v)),
        Expr::Path(path) => {
            let mut v = event;
            for p in path {
                v = v.get(p).ok_or(EvalError)?;
            }
            Ok(Cow::Borrowed(v))
        }
        other => Ok(Cow::Owned(Value::Bool(truth(other, event)?))),
    }
}

fn truth(e: &Expr, event: &Value) -> Result<bool, EvalError> {
    match e {
        // CEL's commutative logic: an error on one side is absorbed by a decisive other side.
        Expr::Or(a, b) => match (truth(a, event), truth(b, event)) {
            (Ok(true), _) | (_, Ok(true)) => Ok(true),
            (Ok(false), Ok(false)) => Ok(false),
            _ => Err(EvalError),
        },
        Expr::And(a, b) => match (truth(a, event), truth(b, event)) {
            (Ok(false), _) | (_, Ok(false)) => Ok(false),
            (Ok(true), Ok(true)) => Ok(true),
            _ => Err(EvalError),
        },
        Expr::Not(a) => Ok(!truth(a, event)?),
        Expr::Compare(op, a, b) => {
            let (a, b) = (value(a, event)?, value(b, event)?);
            match op {
                Op::Eq => Ok(equal(&a, &b)),
                Op::Ne => Ok(!equal(&a, &b)),
                _ => {
                    let ord = match (&*a, &*b) {
                        (Value::Number(x), Value::Number(y)) => x
                            .as_f64()
                            .zip(y.as_f64())
                            .and_then(|(x, y)| x.partial_cmp(&y)),
                        (Value::String(x), Value::String(y)) => Some(x.cmp(y)),
                        _ => None,
                    }
                    .ok_or(EvalError)?;
                    Ok(match op {
                        Op::Lt => ord.is_lt(),
                        Op::Le => ord.is_le(),
                        Op::Gt => ord.is_gt(),
                        _ => ord.is_ge(),
                    })
                }
            }
        }
        Expr::Call(method, target, arg) => {
            let v = value(target, event)?;
            let s = v.as_str().ok_or(EvalError)?;
            Ok(match method {
                Method::StartsWith => s.starts_with(arg.as_str()),
                Method::EndsWith => s.ends_with(arg.as_str()),
                Method::Contains => s.contains(arg.as_str()),
            })
        }
        Expr::Path(_) | Expr::Literal(_) => match &*value(e, event)? {
            Value::Bool(b) => Ok(*b),
            _ => Err(EvalError),
        },
    }
}

fn equal(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        _ => a == b,
    }
}

impl Expr {
    /// Whether the rule matches `event` (the CloudEvent as a JSON object); errors do not match.
    pub fn matches(&self, event: &Value) -> bool {
        truth(self, event).unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn m(src: &str, event: &Value) -> bool {
        parse(src)
            .unwrap_or_else(|e| panic!("{src}: {e}"))
            .matches(event)
    }

    #[test]
    fn evaluates_the_documented_subset() {
        let ev = json!({"type": "order.created", "source": "shop", "data": {"kind": "gold", "n": 3, "ok": true}});
        assert!(m(r#"event.type == "order.created""#, &ev));
        assert!(m(r#"event.type != 'x'"#, &ev));
        assert!(m(
            r#"event.type == "x" || (event.source == "shop" && event.data.kind == "gold")"#,
            &ev
        ));
        assert!(!m(r#"event.type == "x" && event.source == "shop""#, &ev));
        assert!(m(r#"event.type.startsWith("order.")"#, &ev));
        assert!(m(
            r#"event.type.endsWith("created") && event.data.kind.contains("ol")"#,
            &ev
        ));
        assert!(m(r#"event.data.n > 2 && event.data.n <= 3"#, &ev));
        assert!(m(r#"event.data.ok"#, &ev));
        assert!(m(r#"!(event.data.n == 4)"#, &ev));
        assert!(m(r#"event["data"]["kind"] == "gold""#, &ev));
        // A missing field is an error: no match, whichever operator.
        assert!(!m(r#"event.data.missing == "x""#, &ev));
        assert!(!m(r#"event.data.missing != "x""#, &ev));
        // … unless the other side of || decides.
        assert!(m(r#"event.data.missing == "x" || true"#, &ev));
    }

    #[test]
    fn parse_errors_say_where_and_what() {
        for (src, want) in [
            (r#"event.type = "x""#, "unexpected '='"),
            (r#"event.type == "x"#, "unterminated string"),
            (r#"foo.type == "x""#, "expected `event`"),
            (r#"event.type.matches("x")"#, "unsupported function"),
            (r#"event.type == "x" event"#, "expected the end"),
            (r#"(event.type == "x""#, "expected \")\""),
        ] {
            let err = parse(src).unwrap_err();
            assert!(err.contains(want), "{src}: {err}");
        }
    }

    #[test]
    fn deep_or_long_rules_are_refused_not_a_stack_overflow() {
        // 10,000 nested parentheses aborted the process before the limit.
        let deep = format!("{}true{}", "(".repeat(10_000), ")".repeat(10_000));
        assert!(parse(&deep).unwrap_err().contains("at most 512 tokens"));
        let deep = format!("{}true{}", "(".repeat(100), ")".repeat(100));
        let err = parse(&deep).unwrap_err();
        assert!(err.contains("at most 32 levels"), "{err}");
        let nots = format!("{}true", "!".repeat(100));
        assert!(parse(&nots).unwrap_err().contains("at most 32 levels"));
        let chain = vec!["true"; 10_000].join(" && ");
        assert!(parse(&chain).unwrap_err().contains("at most 512 tokens"));
        // At the limits, still fine.
        let ok = format!("{}true{}", "(".repeat(32), ")".repeat(32));
        assert!(m(&ok, &serde_json::json!({})));
        let ok = vec!["true"; 256].join(" && ");
        assert!(m(&ok, &serde_json::json!({})));
    }

    #[test]
    fn an_escaped_multibyte_character_is_taken_whole() {
        // Found by the generative tests: the escape skipped one byte, then sliced mid-char.
        let e = parse("event.type == '\\ਫ਼x'").unwrap();
        assert!(e.matches(&serde_json::json!({"type": "ਫ਼x"})));
        assert!(parse("'\\ਫ਼").is_err());
    }
}
