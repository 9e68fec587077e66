//! The SQL signal: the one number a user's statement returns, read the way
//! an operator may read an application's database.
//!
//! `spec.worker.autoscaling.query.sql` is the user's, so it runs under
//! limits the user cannot lift from inside it:
//! - in a `READ ONLY` transaction that is always rolled back: no write, no
//!   `nextval`, no DDL, whatever the role may do;
//! - under `SET LOCAL statement_timeout`, so a slow statement is cancelled
//!   by the server and holds no lock or backend past it;
//! - as one unnamed statement with no parameters (the extended protocol:
//!   PostgreSQL refuses two statements in one);
//! - reading at most two rows of its answer, so a statement that returns
//!   a table costs no memory.
//!
//! The answer must be one row with one column of a number type (`int2`,
//! `int4`, `int8`, `float4`, `float8`, `numeric`: `count(*)` and
//! `sum(...)` are); `NULL` is refused with the hint to `coalesce` it, since
//! a sum over no rows is `NULL` and a scaler that read it as 0 would hide a
//! broken statement. [`Number`] decodes the values; the shape checks are
//! [`value_of`], pure.

use std::time::Duration;

use futures::{pin_mut, TryStreamExt};
use tokio_postgres::types::{FromSql, Type};
use tokio_postgres::Row;

/// Why a statement gave no value.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SignalError {
    #[error("the query ran past its statement timeout of {} s and was cancelled", .0.as_secs())]
    Timeout(Duration),
    #[error("the query failed: {0}")]
    Failed(String),
    #[error("the query returned no row; it must return one row with one number")]
    NoRow,
    #[error("the query returned more than one row; it must return one row with one number")]
    Rows,
    #[error("the query returned {0} columns; it must return one row with one number")]
    Columns(usize),
    #[error(
        "the query returned a {0}; it must return a number (int2, int4, int8, float4, float8 or numeric)"
    )]
    NotANumber(String),
    #[error("the query returned NULL; wrap it in coalesce(..., 0)")]
    Null,
    #[error("the query returned NaN")]
    NaN,
}

/// A number column's value as `f64`: `NULL` as `None`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Number(pub f64);

impl<'a> FromSql<'a> for Number {
    fn from_sql(ty: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        let value = match *ty {
            Type::INT2 => f64::from(i16::from_sql(ty, raw)?),
            Type::INT4 => f64::from(i32::from_sql(ty, raw)?),
            Type::INT8 => i64::from_sql(ty, raw)? as f64,
            Type::FLOAT4 => f64::from(f32::from_sql(ty, raw)?),
            Type::FLOAT8 => f64::from_sql(ty, raw)?,
            Type::NUMERIC => numeric(raw)?,
            _ => return Err(format!("not a number type: {ty}").into()),
        };
        Ok(Number(value))
    }

    fn accepts(ty: &Type) -> bool {
        matches!(*ty, Type::INT2 | Type::INT4 | Type::INT8 | Type::FLOAT4 | Type::FLOAT8 | Type::NUMERIC)
    }
}

/// A `numeric` in PostgreSQL's binary form: digit count, weight, sign and
/// display scale (16 bits each), then the base-10,000 digits, the first of
/// weight `weight`.
fn numeric(raw: &[u8]) -> Result<f64, Box<dyn std::error::Error + Sync + Send>> {
    let word = |i: usize| -> Result<u16, String> {
        raw.get(2 * i..2 * i + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
            .ok_or_else(|| format!("a numeric of {} bytes is cut short", raw.len()))
    };
    let digits = usize::from(word(0)?);
    let weight = i32::from(word(1)? as i16);
    let value = match word(2)? {
        0xC000 => f64::NAN,
        0xD000 => f64::INFINITY,
        0xF000 => f64::NEG_INFINITY,
        sign => {
            let mut sum = 0.0;
            for i in 0..digits {
                let exponent = weight - i32::try_from(i).unwrap_or(i32::MAX);
                sum += f64::from(word(4 + i)?) * 10_000f64.powi(exponent);
            }
            if sign == 0x4000 {
                -sum
            } else {
                sum
            }
        }
    };
    Ok(value)
}

/// The value of an answer's first rows (at most two are read): one row,
/// one number column, not NULL.
pub fn value_of(rows: &[Row]) -> Result<f64, SignalError> {
    let row = match rows {
        [] => return Err(SignalError::NoRow),
        [row] => row,
        _ => return Err(SignalError::Rows),
    };
    let columns = row.columns();
    if columns.len() != 1 {
        return Err(SignalError::Columns(columns.len()));
    }
    let ty = columns[0].type_();
    if !<Number as FromSql>::accepts(ty) {
        return Err(SignalError::NotANumber(ty.name().to_owned()));
    }
    match row.try_get::<_, Option<Number>>(0) {
        Ok(Some(Number(value))) if value.is_nan() => Err(SignalError::NaN),
        Ok(Some(Number(value))) => Ok(value),
        Ok(None) => Err(SignalError::Null),
        Err(e) => Err(SignalError::Failed(tidepool::error_chain(&e))),
    }
}

/// Runs `sql` on `client` read-only under `timeout` and returns its number.
pub async fn read(
    client: &mut tokio_postgres::Client,
    sql: &str,
    timeout: Duration,
) -> Result<f64, SignalError> {
    let failed = |e: tokio_postgres::Error| {
        if e.code() == Some(&tokio_postgres::error::SqlState::QUERY_CANCELED) {
            SignalError::Timeout(timeout)
        } else {
            SignalError::Failed(tidepool::error_chain(&e))
        }
    };
    let transaction = client.build_transaction().read_only(true).start().await.map_err(failed)?;
    let millis = timeout.as_millis().max(1);
    transaction.batch_execute(&format!("SET LOCAL statement_timeout = {millis}")).await.map_err(failed)?;
    let stream = transaction
        .query_typed_raw(sql, std::iter::empty::<(&(dyn tokio_postgres::types::ToSql + Sync), Type)>())
        .await
        .map_err(failed)?;
    pin_mut!(stream);
    let mut rows = Vec::with_capacity(2);
    while rows.len() < 2 {
        match stream.try_next().await.map_err(failed)? {
            Some(row) => rows.push(row),
            None => break,
        }
    }
    let value = value_of(&rows);
    drop(rows);
    transaction.rollback().await.map_err(failed)?;
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `numeric`'s binary form of `digits` (base 10,000) with `weight` and `sign`.
    fn encoded(weight: i16, sign: u16, digits: &[u16]) -> Vec<u8> {
        let mut raw = Vec::new();
        for word in [digits.len() as u16, weight as u16, sign, 0] {
            raw.extend_from_slice(&word.to_be_bytes());
        }
        for digit in digits {
            raw.extend_from_slice(&digit.to_be_bytes());
        }
        raw
    }

    #[test]
    fn numerics_decode() {
        let decode = |raw: Vec<u8>| numeric(&raw).map_err(|e| e.to_string());
        assert_eq!(decode(encoded(0, 0, &[])), Ok(0.0));
        assert_eq!(decode(encoded(0, 0, &[42])), Ok(42.0));
        assert_eq!(decode(encoded(1, 0, &[12, 3456])), Ok(123_456.0));
        assert_eq!(decode(encoded(0, 0x4000, &[7, 5000])), Ok(-7.5));
        assert_eq!(decode(encoded(-1, 0, &[2500])), Ok(0.25));
        assert_eq!(decode(encoded(2, 0, &[1])), Ok(1e8), "trailing zero digits are left out");
        assert_eq!(decode(encoded(0, 0xD000, &[])), Ok(f64::INFINITY));
        assert!(decode(encoded(0, 0xC000, &[])).is_ok_and(f64::is_nan));
        let mut cut = encoded(1, 0, &[12, 3456]);
        cut.truncate(10);
        assert_eq!(decode(cut), Err("a numeric of 10 bytes is cut short".into()));
        assert!(decode(vec![0, 1]).is_err());
    }

    #[test]
    fn only_number_types_are_accepted() {
        for ty in [Type::INT2, Type::INT4, Type::INT8, Type::FLOAT4, Type::FLOAT8, Type::NUMERIC] {
            assert!(<Number as FromSql>::accepts(&ty), "{ty}");
        }
        for ty in [Type::TEXT, Type::BOOL, Type::INTERVAL, Type::OID, Type::INT8_ARRAY] {
            assert!(!<Number as FromSql>::accepts(&ty), "{ty}");
        }
    }

    #[test]
    fn errors_say_what_to_do() {
        assert_eq!(SignalError::Null.to_string(), "the query returned NULL; wrap it in coalesce(..., 0)");
        assert_eq!(
            SignalError::Timeout(Duration::from_secs(2)).to_string(),
            "the query ran past its statement timeout of 2 s and was cancelled"
        );
        assert_eq!(
            SignalError::NotANumber("text".into()).to_string(),
            "the query returned a text; it must return a number (int2, int4, int8, float4, float8 or numeric)"
        );
    }
}
