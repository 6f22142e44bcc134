//! Topic identity: Kafka gives every topic an id at creation (KIP-516), so
//! a topic deleted and re-created under the same name is told apart from
//! the one a stored offset was read from, however long its new log is.
//!
//! rdkafka has no wrapper for librdkafka's DescribeTopics, so this calls it
//! through the C API, on the client's own handle, with a queue of its own:
//! the one module where courseview allows `unsafe` for it.
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::time::Duration;

use rdkafka::bindings as rd;
use rdkafka::client::{Client, ClientContext};

/// The ids of `topics`, base64 as Kafka tools print them. A topic the
/// cluster gives no id (a broker before Kafka 2.8) is left out: its
/// identity cannot be checked. Blocks up to `timeout`.
pub fn topic_ids<C: ClientContext>(
    client: &Client<C>,
    topics: &[&str],
    timeout: Duration,
) -> Result<HashMap<String, String>, String> {
    if topics.is_empty() {
        return Ok(HashMap::new());
    }
    let names: Vec<CString> = topics
        .iter()
        .map(|t| CString::new(*t).map_err(|_| format!("topic name {t:?} holds a NUL byte")))
        .collect::<Result<_, _>>()?;
    let mut pointers: Vec<*const std::ffi::c_char> = names.iter().map(|n| n.as_ptr()).collect();
    let timeout_ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    let rk = client.native_ptr();
    // SAFETY: every object created here is destroyed before returning (the
    // guards below); `names` outlives the collection, which copies them;
    // strings read from the result are copied before the event is destroyed.
    unsafe {
        let collection = Owned(
            rd::rd_kafka_TopicCollection_of_topic_names(pointers.as_mut_ptr(), pointers.len()),
            rd::rd_kafka_TopicCollection_destroy,
        );
        let options = Owned(
            rd::rd_kafka_AdminOptions_new(rk, rd::rd_kafka_admin_op_t::RD_KAFKA_ADMIN_OP_DESCRIBETOPICS),
            rd::rd_kafka_AdminOptions_destroy,
        );
        let mut errstr = [0 as std::ffi::c_char; 256];
        rd::rd_kafka_AdminOptions_set_request_timeout(options.0, timeout_ms, errstr.as_mut_ptr(), errstr.len());
        let queue = Owned(rd::rd_kafka_queue_new(rk), rd::rd_kafka_queue_destroy);
        rd::rd_kafka_DescribeTopics(rk, collection.0, options.0, queue.0);
        // A little longer than the request's own timeout, which answers first.
        let event = Owned(
            rd::rd_kafka_queue_poll(queue.0, timeout_ms.saturating_add(1_000)),
            rd::rd_kafka_event_destroy,
        );
        if event.0.is_null() {
            return Err(format!("no answer to DescribeTopics within {timeout:?}"));
        }
        if rd::rd_kafka_event_error(event.0) != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
            return Err(format!(
                "DescribeTopics: {}",
                text(rd::rd_kafka_event_error_string(event.0))
            ));
        }
        let result = rd::rd_kafka_event_DescribeTopics_result(event.0);
        if result.is_null() {
            return Err("DescribeTopics answered with another event".to_owned());
        }
        let mut count = 0;
        let described = rd::rd_kafka_DescribeTopics_result_topics(result, &mut count);
        let mut ids = HashMap::new();
        for i in 0..count {
            let description = *described.add(i);
            // librdkafka leaves a hole for a topic the broker left out.
            if description.is_null() {
                continue;
            }
            let name = text(rd::rd_kafka_TopicDescription_name(description));
            let error = rd::rd_kafka_TopicDescription_error(description);
            if !error.is_null() && rd::rd_kafka_error_code(error) != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
            {
                return Err(format!(
                    "describing topic {name}: {}",
                    text(rd::rd_kafka_error_string(error))
                ));
            }
            let id = rd::rd_kafka_TopicDescription_topic_id(description);
            if id.is_null()
                || (rd::rd_kafka_Uuid_most_significant_bits(id) == 0
                    && rd::rd_kafka_Uuid_least_significant_bits(id) == 0)
            {
                continue;
            }
            // Null (its allocation failed) reads as empty: unknown, not an id.
            let id = text(rd::rd_kafka_Uuid_base64str(id));
            if !id.is_empty() {
                ids.insert(name, id);
            }
        }
        Ok(ids)
    }
}

/// A librdkafka object and its destructor.
struct Owned<T>(*mut T, unsafe extern "C" fn(*mut T));

impl<T> Drop for Owned<T> {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: created by the matching librdkafka constructor, destroyed once.
            unsafe { (self.1)(self.0) }
        }
    }
}

/// A C string librdkafka owns, copied.
///
/// # Safety
/// `s` is null or a valid NUL-terminated string.
unsafe fn text(s: *const std::ffi::c_char) -> String {
    if s.is_null() {
        return String::new();
    }
    CStr::from_ptr(s).to_string_lossy().into_owned()
}
