-- dicom-node on PostgreSQL, step 3 of roles.sql: what the runtime roles may do, once the
-- node has created its tables as the owners. Run as a superuser; idempotent.
--
-- The index role reads and writes the node's tables but cannot change the schema; the
-- audit role may only read and append the audit log.

\connect dicomnode
GRANT USAGE ON SCHEMA public TO dicomnode;
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO dicomnode;
GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA public TO dicomnode;

\connect dicomnode_audit
GRANT USAGE ON SCHEMA public TO dicomnode_audit;
GRANT SELECT, INSERT ON audit_events TO dicomnode_audit;
REVOKE UPDATE, DELETE, TRUNCATE ON audit_events FROM dicomnode_audit;
