//! Subscription filters: correlation filters and a subset of SQL filters.
//!
//! Supported SQL: literals (numbers, 'strings', TRUE, FALSE, NULL), identifiers
//! (`prop`, `user.prop`, `[quoted name]`, `sys.Label`, `sys.MessageId`,
//! `sys.CorrelationId`, `sys.ContentType`, `sys.To`, `sys.ReplyTo`,
//! `sys.SessionId`, `sys.ReplyToSessionId`), comparisons `= <> != < <= > >=`,
//! `IS [NOT] NULL`, `[NOT] LIKE` with `%` and `_`, `[NOT] IN (..)`, `EXISTS(prop)`,
//! `AND`, `OR`, `NOT` and parentheses. Anything else is rejected when the rule is created.

use fe2o3_amqp_types::messaging::MessageId;
use fe2o3_amqp_types::primitives::SimpleValue;

use crate::config::{CorrelationFilter, Filter};
use crate::message::AmqpMessage;

/// A value during SQL evaluation.
#[derive(Debug, Clone, PartialEq)]
enum Val {
    Null,
    Bool(bool),
    Num(f64),
    Str(String),
}

/// A parsed SQL filter expression.
#[derive(Debug, Clone, PartialEq)]
pub enum SqlExpr {
    /// A literal.
    Lit(LitVal),
    /// A property reference.
    Ident(String),
    /// Binary comparison.
    Cmp(Box<SqlExpr>, CmpOp, Box<SqlExpr>),
    /// AND.
    And(Box<SqlExpr>, Box<SqlExpr>),
    /// OR.
    Or(Box<SqlExpr>, Box<SqlExpr>),
    /// NOT.
    Not(Box<SqlExpr>),
    /// IS NULL (negated when the flag is true).
    IsNull(Box<SqlExpr>, bool),
    /// LIKE pattern (negated when the flag is true).
    Like(Box<SqlExpr>, String, bool),
    /// IN list (negated when the flag is true).
    In(Box<SqlExpr>, Vec<LitVal>, bool),
    /// EXISTS(property).
    Exists(String),
}

/// A literal value.
#[derive(Debug, Clone, PartialEq)]
pub enum LitVal {
    /// NULL
    Null,
    /// TRUE / FALSE
    Bool(bool),
    /// A number.
    Num(f64),
    /// A string.
    Str(String),
}

/// Comparison operators.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CmpOp {
    /// =
    Eq,
    /// <> or !=
    Ne,
    /// <
    Lt,
    /// <=
    Le,
    /// >
    Gt,
    /// >=
    Ge,
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Num(f64),
    Str(String),
    Word(String),
    Op(&'static str),
    LParen,
    RParen,
    Comma,
}

fn tokenize(s: &str) -> Result<Vec<Tok>, String> {
    let c: Vec<char> = s.chars().collect();
    let mut i = 0;
    let mut out = Vec::new();
    while i < c.len() {
        let ch = c[i];
        if ch.is_whitespace() {
            i += 1;
        } else if ch == '(' {
            out.push(Tok::LParen);
            i += 1;
        } else if ch == ')' {
            out.push(Tok::RParen);
            i += 1;
        } else if ch == ',' {
            out.push(Tok::Comma);
            i += 1;
        } else if ch == '\'' {
            let mut v = String::new();
            i += 1;
            loop {
                match c.get(i) {
                    None => return Err("unterminated string literal".into()),
                    Some('\'') if c.get(i + 1) == Some(&'\'') => {
                        v.push('\'');
                        i += 2;
                    }
                    Some('\'') => {
                        i += 1;
                        break;
                    }
                    Some(x) => {
                        v.push(*x);
                        i += 1;
                    }
                }
            }
            out.push(Tok::Str(v));
        } else if ch == '[' {
            let mut v = String::new();
            i += 1;
            while let Some(x) = c.get(i) {
                i += 1;
                if *x == ']' {
                    break;
                }
                v.push(*x);
            }
            out.push(Tok::Word(v));
        } else if ch.is_ascii_digit()
            || (ch == '.' && c.get(i + 1).is_some_and(|d| d.is_ascii_digit()))
        {
            let start = i;
            while i < c.len()
                && (c[i].is_ascii_digit() || c[i] == '.' || c[i] == 'e' || c[i] == 'E')
            {
                i += 1;
            }
            let text: String = c[start..i].iter().collect();
            out.push(Tok::Num(
                text.parse().map_err(|_| format!("bad number {text}"))?,
            ));
        } else if ch.is_alphabetic() || ch == '_' || ch == '$' {
            let start = i;
            while i < c.len()
                && (c[i].is_alphanumeric()
                    || c[i] == '_'
                    || c[i] == '.'
                    || c[i] == '$'
                    || c[i] == '-')
            {
                i += 1;
            }
            out.push(Tok::Word(c[start..i].iter().collect()));
        } else {
            let two: String = c[i..(i + 2).min(c.len())].iter().collect();
            let op = match two.as_str() {
                "<>" => Some("<>"),
                "!=" => Some("<>"),
                "<=" => Some("<="),
                ">=" => Some(">="),
                _ => None,
            };
            if let Some(op) = op {
                out.push(Tok::Op(op));
                i += 2;
            } else {
                let op = match ch {
                    '=' => "=",
                    '<' => "<",
                    '>' => ">",
                    '-' => "-",
                    _ => return Err(format!("unexpected character `{ch}`")),
                };
                out.push(Tok::Op(op));
                i += 1;
            }
        }
    }
    Ok(out)
}

struct Parser {
    toks: Vec<Tok>,
    pos: usize,
}

impl Parser {
    fn peek_word(&self, w: &str) -> bool {
        matches!(self.toks.get(self.pos), Some(Tok::Word(x)) if x.eq_ignore_ascii_case(w))
    }
    fn eat_word(&mut self, w: &str) -> bool {
        if self.peek_word(w) {
            self.pos += 1;
            true
        } else {
            false
        }
    }
    fn expect(&mut self, t: Tok) -> Result<(), String> {
        if self.toks.get(self.pos) == Some(&t) {
            self.pos += 1;
            Ok(())
        } else {
            Err(format!("expected {t:?}"))
        }
    }
    fn or(&mut self) -> Result<SqlExpr, String> {
        let mut l = self.and()?;
        while self.eat_word("OR") {
            l = SqlExpr::Or(Box::new(l), Box::new(self.and()?));
        }
        Ok(l)
    }
    fn and(&mut self) -> Result<SqlExpr, String> {
        let mut l = self.not()?;
        while self.eat_word("AND") {
            l = SqlExpr::And(Box::new(l), Box::new(self.not()?));
        }
        Ok(l)
    }
    fn not(&mut self) -> Result<SqlExpr, String> {
        if self.eat_word("NOT") {
            return Ok(SqlExpr::Not(Box::new(self.not()?)));
        }
        self.cmp()
    }
    fn literal(&mut self) -> Result<LitVal, String> {
        match self.toks.get(self.pos).cloned() {
            Some(Tok::Num(n)) => {
                self.pos += 1;
                Ok(LitVal::Num(n))
            }
            Some(Tok::Op("-")) => {
                self.pos += 1;
                match self.literal()? {
                    LitVal::Num(n) => Ok(LitVal::Num(-n)),
                    _ => Err("`-` must precede a number".into()),
                }
            }
            Some(Tok::Str(s)) => {
                self.pos += 1;
                Ok(LitVal::Str(s))
            }
            Some(Tok::Word(w)) if w.eq_ignore_ascii_case("TRUE") => {
                self.pos += 1;
                Ok(LitVal::Bool(true))
            }
            Some(Tok::Word(w)) if w.eq_ignore_ascii_case("FALSE") => {
                self.pos += 1;
                Ok(LitVal::Bool(false))
            }
            Some(Tok::Word(w)) if w.eq_ignore_ascii_case("NULL") => {
                self.pos += 1;
                Ok(LitVal::Null)
            }
            other => Err(format!("expected a literal, found {other:?}")),
        }
    }
    fn operand(&mut self) -> Result<SqlExpr, String> {
        match self.toks.get(self.pos).cloned() {
            Some(Tok::LParen) => {
                self.pos += 1;
                let e = self.or()?;
                self.expect(Tok::RParen)?;
                Ok(e)
            }
            Some(Tok::Word(w)) if w.eq_ignore_ascii_case("EXISTS") => {
                self.pos += 1;
                self.expect(Tok::LParen)?;
                let name = match self.toks.get(self.pos).cloned() {
                    Some(Tok::Word(n)) => n,
                    _ => return Err("EXISTS needs a property name".into()),
                };
                self.pos += 1;
                self.expect(Tok::RParen)?;
                Ok(SqlExpr::Exists(name))
            }
            Some(Tok::Word(w))
                if ![
                    "TRUE", "FALSE", "NULL", "AND", "OR", "NOT", "IS", "LIKE", "IN",
                ]
                .iter()
                .any(|k| w.eq_ignore_ascii_case(k)) =>
            {
                self.pos += 1;
                Ok(SqlExpr::Ident(w))
            }
            _ => Ok(SqlExpr::Lit(self.literal()?)),
        }
    }
    fn cmp(&mut self) -> Result<SqlExpr, String> {
        let l = self.operand()?;
        if self.eat_word("IS") {
            let neg = self.eat_word("NOT");
            if !self.eat_word("NULL") {
                return Err("expected NULL after IS".into());
            }
            return Ok(SqlExpr::IsNull(Box::new(l), neg));
        }
        let neg = self.eat_word("NOT");
        if self.eat_word("LIKE") {
            return match self.literal()? {
                LitVal::Str(p) => Ok(SqlExpr::Like(Box::new(l), p, neg)),
                _ => Err("LIKE needs a string pattern".into()),
            };
        }
        if self.eat_word("IN") {
            self.expect(Tok::LParen)?;
            let mut items = vec![self.literal()?];
            while self.toks.get(self.pos) == Some(&Tok::Comma) {
                self.pos += 1;
                items.push(self.literal()?);
            }
            self.expect(Tok::RParen)?;
            return Ok(SqlExpr::In(Box::new(l), items, neg));
        }
        if neg {
            return Err("expected LIKE or IN after NOT".into());
        }
        let op = match self.toks.get(self.pos) {
            Some(Tok::Op("=")) => CmpOp::Eq,
            Some(Tok::Op("<>")) => CmpOp::Ne,
            Some(Tok::Op("<")) => CmpOp::Lt,
            Some(Tok::Op("<=")) => CmpOp::Le,
            Some(Tok::Op(">")) => CmpOp::Gt,
            Some(Tok::Op(">=")) => CmpOp::Ge,
            _ => return Ok(l),
        };
        self.pos += 1;
        let r = self.operand()?;
        Ok(SqlExpr::Cmp(Box::new(l), op, Box::new(r)))
    }
}

impl SqlExpr {
    /// Parse a SQL filter expression.
    pub fn parse(s: &str) -> Result<SqlExpr, String> {
        let toks = tokenize(s)?;
        if toks.is_empty() {
            return Err("empty SQL expression".into());
        }
        let mut p = Parser { toks, pos: 0 };
        let e = p.or()?;
        if p.pos != p.toks.len() {
            return Err(format!("unexpected token {:?}", p.toks[p.pos]));
        }
        Ok(e)
    }

    /// Evaluate against a message; unknown (NULL) counts as false.
    pub fn matches(&self, m: &AmqpMessage) -> bool {
        eval(self, m) == Val::Bool(true)
    }
}

fn lit(l: &LitVal) -> Val {
    match l {
        LitVal::Null => Val::Null,
        LitVal::Bool(b) => Val::Bool(*b),
        LitVal::Num(n) => Val::Num(*n),
        LitVal::Str(s) => Val::Str(s.clone()),
    }
}

fn message_id_string(id: &MessageId) -> String {
    match id {
        MessageId::String(s) => s.clone(),
        MessageId::Ulong(u) => u.to_string(),
        MessageId::Uuid(u) => uuid::Uuid::from_bytes(*u.as_inner()).to_string(),
        MessageId::Binary(b) => b.iter().map(|x| format!("{x:02x}")).collect(),
    }
}

fn simple_to_val(v: &SimpleValue) -> Val {
    match v {
        SimpleValue::Null => Val::Null,
        SimpleValue::Bool(b) => Val::Bool(*b),
        SimpleValue::Ubyte(x) => Val::Num(f64::from(*x)),
        SimpleValue::Ushort(x) => Val::Num(f64::from(*x)),
        SimpleValue::Uint(x) => Val::Num(f64::from(*x)),
        SimpleValue::Ulong(x) => Val::Num(*x as f64),
        SimpleValue::Byte(x) => Val::Num(f64::from(*x)),
        SimpleValue::Short(x) => Val::Num(f64::from(*x)),
        SimpleValue::Int(x) => Val::Num(f64::from(*x)),
        SimpleValue::Long(x) => Val::Num(*x as f64),
        SimpleValue::Float(x) => Val::Num(f64::from(x.into_inner())),
        SimpleValue::Double(x) => Val::Num(x.into_inner()),
        SimpleValue::Char(c) => Val::Str(c.to_string()),
        SimpleValue::Timestamp(t) => Val::Num(t.milliseconds() as f64),
        SimpleValue::Uuid(u) => Val::Str(uuid::Uuid::from_bytes(*u.as_inner()).to_string()),
        SimpleValue::String(s) => Val::Str(s.clone()),
        SimpleValue::Symbol(s) => Val::Str(s.0.clone()),
        _ => Val::Null,
    }
}

fn lookup(name: &str, m: &AmqpMessage) -> Val {
    let lower = name.to_ascii_lowercase();
    if let Some(sys) = lower.strip_prefix("sys.") {
        let p = match &m.properties {
            Some(p) => p,
            None => return Val::Null,
        };
        let s = match sys {
            "label" | "subject" => p.subject.clone(),
            "messageid" => p.message_id.as_ref().map(message_id_string),
            "correlationid" => p.correlation_id.as_ref().map(message_id_string),
            "contenttype" => p.content_type.as_ref().map(|s| s.0.clone()),
            "to" => p.to.clone(),
            "replyto" => p.reply_to.clone(),
            "sessionid" => p.group_id.clone(),
            "replytosessionid" => p.reply_to_group_id.clone(),
            _ => None,
        };
        return s.map_or(Val::Null, Val::Str);
    }
    let key = name.strip_prefix("user.").unwrap_or(name);
    m.application_properties
        .as_ref()
        .and_then(|ap| {
            ap.iter()
                .find(|(k, _)| k.as_str() == key)
                .map(|(_, v)| simple_to_val(v))
        })
        .unwrap_or(Val::Null)
}

fn like(s: &str, p: &str) -> bool {
    fn rec(s: &[char], p: &[char]) -> bool {
        match p.first() {
            None => s.is_empty(),
            Some('%') => (0..=s.len()).any(|i| rec(&s[i..], &p[1..])),
            Some('_') => !s.is_empty() && rec(&s[1..], &p[1..]),
            Some(c) => s.first() == Some(c) && rec(&s[1..], &p[1..]),
        }
    }
    let s: Vec<char> = s.chars().collect();
    let p: Vec<char> = p.chars().collect();
    rec(&s, &p)
}

fn compare(a: &Val, op: CmpOp, b: &Val) -> Val {
    let ord = match (a, b) {
        (Val::Null, _) | (_, Val::Null) => return Val::Null,
        (Val::Num(x), Val::Num(y)) => x.partial_cmp(y),
        (Val::Str(x), Val::Str(y)) => Some(x.cmp(y)),
        (Val::Bool(x), Val::Bool(y)) => Some(x.cmp(y)),
        _ => return Val::Bool(op == CmpOp::Ne),
    };
    let Some(o) = ord else { return Val::Null };
    use std::cmp::Ordering::*;
    Val::Bool(match op {
        CmpOp::Eq => o == Equal,
        CmpOp::Ne => o != Equal,
        CmpOp::Lt => o == Less,
        CmpOp::Le => o != Greater,
        CmpOp::Gt => o == Greater,
        CmpOp::Ge => o != Less,
    })
}

fn eval(e: &SqlExpr, m: &AmqpMessage) -> Val {
    match e {
        SqlExpr::Lit(l) => lit(l),
        SqlExpr::Ident(n) => lookup(n, m),
        SqlExpr::Cmp(a, op, b) => compare(&eval(a, m), *op, &eval(b, m)),
        SqlExpr::And(a, b) => match (eval(a, m), eval(b, m)) {
            (Val::Bool(false), _) | (_, Val::Bool(false)) => Val::Bool(false),
            (Val::Bool(true), Val::Bool(true)) => Val::Bool(true),
            _ => Val::Null,
        },
        SqlExpr::Or(a, b) => match (eval(a, m), eval(b, m)) {
            (Val::Bool(true), _) | (_, Val::Bool(true)) => Val::Bool(true),
            (Val::Bool(false), Val::Bool(false)) => Val::Bool(false),
            _ => Val::Null,
        },
        SqlExpr::Not(a) => match eval(a, m) {
            Val::Bool(b) => Val::Bool(!b),
            _ => Val::Null,
        },
        SqlExpr::IsNull(a, neg) => Val::Bool((eval(a, m) == Val::Null) != *neg),
        SqlExpr::Like(a, p, neg) => match eval(a, m) {
            Val::Str(s) => Val::Bool(like(&s, p) != *neg),
            _ => Val::Null,
        },
        SqlExpr::In(a, items, neg) => {
            let v = eval(a, m);
            if v == Val::Null {
                return Val::Null;
            }
            let found = items
                .iter()
                .any(|i| compare(&v, CmpOp::Eq, &lit(i)) == Val::Bool(true));
            Val::Bool(found != *neg)
        }
        SqlExpr::Exists(n) => Val::Bool(lookup(n, m) != Val::Null),
    }
}

fn json_matches(expected: &serde_json::Value, actual: &Val) -> bool {
    match (expected, actual) {
        (serde_json::Value::String(s), Val::Str(a)) => s == a,
        (serde_json::Value::Number(n), Val::Num(a)) => n.as_f64() == Some(*a),
        (serde_json::Value::Bool(b), Val::Bool(a)) => b == a,
        (serde_json::Value::String(s), Val::Num(a)) => s.parse::<f64>().ok() == Some(*a),
        (serde_json::Value::String(s), Val::Bool(a)) => s.eq_ignore_ascii_case(&a.to_string()),
        _ => false,
    }
}

impl CorrelationFilter {
    /// Whether every set field equals the message's.
    pub fn matches(&self, m: &AmqpMessage) -> bool {
        let checks: [(&Option<String>, &str); 8] = [
            (&self.content_type, "sys.ContentType"),
            (&self.correlation_id, "sys.CorrelationId"),
            (&self.label, "sys.Label"),
            (&self.message_id, "sys.MessageId"),
            (&self.reply_to, "sys.ReplyTo"),
            (&self.reply_to_session_id, "sys.ReplyToSessionId"),
            (&self.session_id, "sys.SessionId"),
            (&self.to, "sys.To"),
        ];
        for (want, field) in checks {
            if let Some(w) = want
                && lookup(field, m) != Val::Str(w.clone())
            {
                return false;
            }
        }
        self.properties
            .iter()
            .all(|(k, v)| json_matches(v, &lookup(&format!("user.{k}"), m)))
    }
}

/// A filter compiled for evaluation.
#[derive(Debug, Clone)]
pub enum CompiledFilter {
    /// Always true.
    True,
    /// Always false.
    False,
    /// Correlation filter.
    Correlation(CorrelationFilter),
    /// SQL filter.
    Sql(SqlExpr),
}

impl CompiledFilter {
    /// Compile a configured filter.
    pub fn compile(f: &Filter) -> Result<Self, String> {
        Ok(match f {
            Filter::True => CompiledFilter::True,
            Filter::False => CompiledFilter::False,
            Filter::Correlation(c) => CompiledFilter::Correlation(c.clone()),
            Filter::Sql(s) => CompiledFilter::Sql(SqlExpr::parse(s)?),
        })
    }

    /// Evaluate.
    pub fn matches(&self, m: &AmqpMessage) -> bool {
        match self {
            CompiledFilter::True => true,
            CompiledFilter::False => false,
            CompiledFilter::Correlation(c) => c.matches(m),
            CompiledFilter::Sql(e) => e.matches(m),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fe2o3_amqp_types::messaging::Properties;
    use serde_amqp::primitives::OrderedMap;

    fn msg() -> AmqpMessage {
        let mut ap = OrderedMap::new();
        ap.insert("color".to_string(), SimpleValue::String("red".into()));
        ap.insert("quantity".to_string(), SimpleValue::Int(12));
        AmqpMessage {
            properties: Some(Properties {
                subject: Some("s1".into()),
                ..Default::default()
            }),
            application_properties: Some(ap),
            ..Default::default()
        }
    }

    #[test]
    fn sql_subset() {
        let m = msg();
        for (sql, want) in [
            ("1=1", true),
            ("1=0", false),
            ("color = 'red'", true),
            ("color = 'red' AND quantity > 10", true),
            ("color = 'blue' OR quantity >= 12", true),
            ("NOT (color = 'red')", false),
            ("sys.Label = 's1'", true),
            ("missing IS NULL", true),
            ("missing = 1", false),
            ("color LIKE 'r%'", true),
            ("color IN ('blue', 'red')", true),
            ("EXISTS(color)", true),
            ("user.quantity <> 12", false),
        ] {
            let e = SqlExpr::parse(sql).expect(sql);
            assert_eq!(e.matches(&m), want, "{sql}");
        }
        assert!(SqlExpr::parse("color = ").is_err());
        assert!(SqlExpr::parse("").is_err());
    }

    #[test]
    fn correlation() {
        let m = msg();
        let f = CorrelationFilter {
            label: Some("s1".into()),
            properties: vec![("color".into(), "red".into())],
            ..Default::default()
        };
        assert!(f.matches(&m));
        let g = CorrelationFilter {
            label: Some("s2".into()),
            ..Default::default()
        };
        assert!(!g.matches(&m));
    }
}
