-- Run once by the postgres image on an empty volume (as POSTGRES_USER, who owns what it creates):
-- one database per service, since no service reads another's data.
CREATE DATABASE intake;
CREATE DATABASE referral;
CREATE DATABASE notifications;
