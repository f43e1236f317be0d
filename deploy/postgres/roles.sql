-- dicom-node on PostgreSQL: databases, roles and the append-only audit log.
--
-- 1. Run once as a superuser: psql -v node_password=... -v audit_password=... -f roles.sql
-- 2. Start the node once with the owner roles' URLs, so it creates its tables (Alembic for
--    the index; the audit table and its triggers for the log), and stop it.
-- 3. Run grants.sql as a superuser (idempotent: rerun it after an upgrade that adds tables).
-- 4. Switch the node's URLs to the runtime roles, e.g. in the systemd EnvironmentFile:
--
--   DICOM_NODE_DATABASE_URL=postgresql+psycopg://dicomnode:...@db/dicomnode
--   DICOM_NODE_AUDIT_DATABASE_URL=postgresql+psycopg://dicomnode_audit:...@db/dicomnode_audit
--
-- The runtime audit role may only read and append: it cannot UPDATE, DELETE or TRUNCATE
-- the log, and cannot drop or alter its triggers (it does not own the table). The triggers
-- refuse rewriting even to the owner. The hash chain (dicom-node audit verify) detects what
-- a superuser could still do.

-- Owners: hold the schema, run migrations. Never the roles the node runs as day to day.
CREATE ROLE dicomnode_owner LOGIN;
CREATE ROLE dicomnode_audit_owner LOGIN;
-- Runtime roles.
CREATE ROLE dicomnode LOGIN PASSWORD :'node_password';
CREATE ROLE dicomnode_audit LOGIN PASSWORD :'audit_password';

CREATE DATABASE dicomnode OWNER dicomnode_owner;
CREATE DATABASE dicomnode_audit OWNER dicomnode_audit_owner;
