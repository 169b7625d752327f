//! Conversions between Python objects and the core's plain data: JSON values and durations.
//! (`pythonize` would do the JSON part; this is the few lines we need.)

use std::time::Duration;

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};
use serde_json::{Map, Number, Value};

/// The deepest nesting accepted from Python; a container that holds itself would recurse forever.
const MAX_DEPTH: usize = 64;

/// A JSON value as the Python object `json.loads` would give.
pub fn json_to_py<'py>(py: Python<'py>, value: &Value) -> PyResult<Bound<'py, PyAny>> {
    Ok(match value {
        Value::Null => py.None().into_bound(py),
        Value::Bool(flag) => PyBool::new(py, *flag).to_owned().into_any(),
        Value::Number(number) => number_to_py(py, number)?,
        Value::String(text) => PyString::new(py, text).into_any(),
        Value::Array(items) => {
            let list = PyList::empty(py);
            for item in items {
                list.append(json_to_py(py, item)?)?;
            }
            list.into_any()
        }
        Value::Object(map) => {
            let dict = PyDict::new(py);
            for (key, item) in map {
                dict.set_item(key, json_to_py(py, item)?)?;
            }
            dict.into_any()
        }
    })
}

fn number_to_py<'py>(py: Python<'py>, number: &Number) -> PyResult<Bound<'py, PyAny>> {
    if let Some(integer) = number.as_i64() {
        return Ok(integer.into_pyobject(py)?.into_any());
    }
    if let Some(integer) = number.as_u64() {
        return Ok(integer.into_pyobject(py)?.into_any());
    }
    match number.as_f64() {
        Some(float) => Ok(PyFloat::new(py, float).into_any()),
        // Unreachable without serde_json's arbitrary precision; keep the digits rather than fail.
        None => Ok(PyString::new(py, &number.to_string()).into_any()),
    }
}

/// A Python object as JSON: `None`, `bool`, `int`, `float`, `str`, `list`/`tuple` and `dict`
/// with `str` keys, nested. Anything else is a `TypeError`; NaN, infinities and integers
/// outside 64 bits are a `ValueError`.
pub fn py_to_json(object: &Bound<'_, PyAny>) -> PyResult<Value> {
    to_json_at(object, 0)
}

fn to_json_at(object: &Bound<'_, PyAny>, depth: usize) -> PyResult<Value> {
    if depth > MAX_DEPTH {
        return Err(PyValueError::new_err(format!(
            "value nested deeper than {MAX_DEPTH} levels (does a container hold itself?)"
        )));
    }
    if object.is_none() {
        return Ok(Value::Null);
    }
    // `bool` is a subclass of `int`: test it first.
    if let Ok(flag) = object.cast::<PyBool>() {
        return Ok(Value::Bool(flag.is_true()));
    }
    if object.is_instance_of::<PyInt>() {
        if let Ok(integer) = object.extract::<i64>() {
            return Ok(Value::from(integer));
        }
        if let Ok(integer) = object.extract::<u64>() {
            return Ok(Value::from(integer));
        }
        return Err(PyValueError::new_err(format!(
            "integer {object} does not fit in 64 bits"
        )));
    }
    if let Ok(float) = object.cast::<PyFloat>() {
        let value = float.value();
        return Number::from_f64(value)
            .map(Value::Number)
            .ok_or_else(|| PyValueError::new_err(format!("{value} is not a JSON number")));
    }
    if let Ok(text) = object.cast::<PyString>() {
        return Ok(Value::String(text.to_str()?.to_owned()));
    }
    if let Ok(list) = object.cast::<PyList>() {
        return list
            .iter()
            .map(|item| to_json_at(&item, depth + 1))
            .collect();
    }
    if let Ok(tuple) = object.cast::<PyTuple>() {
        return tuple
            .iter()
            .map(|item| to_json_at(&item, depth + 1))
            .collect();
    }
    if let Ok(dict) = object.cast::<PyDict>() {
        let mut map = Map::with_capacity(dict.len());
        for (key, item) in dict.iter() {
            let key = key.cast::<PyString>().map_err(|_| {
                PyTypeError::new_err(format!("dict keys must be str, got {}", type_name(&key)))
            })?;
            map.insert(key.to_str()?.to_owned(), to_json_at(&item, depth + 1)?);
        }
        return Ok(Value::Object(map));
    }
    Err(PyTypeError::new_err(format!(
        "{} is not JSON data: use None, bool, int, float, str, list, tuple or dict",
        type_name(object)
    )))
}

/// The name of an object's type, for error messages.
pub fn type_name(object: &Bound<'_, PyAny>) -> String {
    object
        .get_type()
        .name()
        .map(|name| name.to_string())
        .unwrap_or_else(|_| "object".to_owned())
}

/// A duration given from Python as seconds (`int` or `float`) or a `datetime.timedelta`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Seconds(pub Duration);

impl<'py> FromPyObject<'_, 'py> for Seconds {
    type Error = PyErr;

    fn extract(object: Borrowed<'_, 'py, PyAny>) -> PyResult<Self> {
        let seconds: f64 = if object.is_instance_of::<PyBool>() {
            return Err(PyTypeError::new_err(
                "expected seconds (int or float) or a timedelta, got bool",
            ));
        } else if object.is_instance_of::<PyInt>() || object.is_instance_of::<PyFloat>() {
            object.extract()?
        } else if object.hasattr("total_seconds")? {
            object.call_method0("total_seconds")?.extract()?
        } else {
            return Err(PyTypeError::new_err(format!(
                "expected seconds (int or float) or a timedelta, got {}",
                type_name(&object)
            )));
        };
        Duration::try_from_secs_f64(seconds)
            .map(Seconds)
            .map_err(|_| {
                PyValueError::new_err(format!(
                    "expected a duration of zero or more seconds, got {seconds}"
                ))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn eval<'py>(py: Python<'py>, code: &str) -> Bound<'py, PyAny> {
        let code = std::ffi::CString::new(code).unwrap();
        py.eval(&code, None, None).unwrap()
    }

    #[test]
    fn json_survives_a_round_trip_through_python() {
        Python::initialize();
        Python::attach(|py| {
            let value =
                json!({"a": [1, -2, 3.5, true, null, "x"], "big": u64::MAX, "nested": {"k": {}}});
            let object = json_to_py(py, &value).unwrap();
            assert_eq!(py_to_json(&object).unwrap(), value);
        });
    }

    #[test]
    fn python_data_becomes_json_and_the_rest_is_refused() {
        Python::initialize();
        Python::attach(|py| {
            let object = eval(py, "{'ok': (True, 1, 2.0), 'none': None}");
            assert_eq!(
                py_to_json(&object).unwrap(),
                json!({"ok": [true, 1, 2.0], "none": null})
            );
            let error = |code: &str| py_to_json(&eval(py, code)).unwrap_err().to_string();
            assert!(error("{1: 2}").contains("dict keys must be str, got int"));
            assert!(error("object()").contains("object is not JSON data"));
            assert!(error("float('nan')").contains("not a JSON number"));
            assert!(error("2**70").contains("does not fit in 64 bits"));
            assert!(error("(lambda l: (l.append(l), l)[1])([])").contains("nested deeper"));
        });
    }

    #[test]
    fn seconds_accept_numbers_and_timedeltas_only() {
        Python::initialize();
        Python::attach(|py| {
            let seconds = |code: &str| eval(py, code).extract::<Seconds>();
            assert_eq!(seconds("1.5").unwrap().0, Duration::from_millis(1500));
            assert_eq!(seconds("2").unwrap().0, Duration::from_secs(2));
            let timedelta = eval(py, "__import__('datetime').timedelta(milliseconds=250)");
            assert_eq!(
                timedelta.extract::<Seconds>().unwrap().0,
                Duration::from_millis(250)
            );
            assert!(seconds("-1")
                .unwrap_err()
                .to_string()
                .contains("zero or more"));
            assert!(seconds("True")
                .unwrap_err()
                .to_string()
                .contains("got bool"));
            assert!(seconds("'5'").unwrap_err().to_string().contains("got str"));
        });
    }
}
