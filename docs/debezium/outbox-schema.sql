-- The course service's tables (the write side; not courseview's): a course
-- row and an outbox row are written in one transaction, and Debezium's
-- outbox router relays the outbox rows to Kafka. Used by docker-compose.yml's
-- `outbox` profile and by the tests (tests/it/outbox.rs).
CREATE TABLE course (
  course_id VARCHAR(64) PRIMARY KEY,
  name VARCHAR(255), thumbnail VARCHAR(1024), description TEXT,
  teacher_id VARCHAR(64), registered_at DATETIME(3),
  last_updated_at DATETIME(3), posted BOOLEAN NOT NULL DEFAULT FALSE);
CREATE TABLE outbox (
  id VARCHAR(64) PRIMARY KEY,
  aggregatetype VARCHAR(255) NOT NULL,
  aggregateid VARCHAR(255) NOT NULL,
  type VARCHAR(255) NOT NULL,
  payload LONGTEXT NOT NULL,
  timestamp DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
  -- Debezium's outbox tracing column: the course service's trace context
  -- as java.util.Properties text ("traceparent=00-…"); the connector places
  -- it in a record header, where courseview's worker links its span to it.
  tracingspancontext VARCHAR(512) NULL);
