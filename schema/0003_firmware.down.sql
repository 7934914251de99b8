-- 0003 down: drops the rollouts and the firmware catalogue (their history with them).
DROP TABLE rollout_devices;
DROP TABLE rollouts;
DROP TABLE firmware;
