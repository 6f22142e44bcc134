-- What Debezium's MariaDB connector needs of its user (Debezium's docs).
GRANT SELECT, RELOAD, SHOW DATABASES, REPLICATION SLAVE, REPLICATION CLIENT ON *.* TO 'courseview'@'%';
