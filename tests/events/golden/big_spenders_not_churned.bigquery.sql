WITH `events_1` AS
(SELECT `d`.`user_id` AS `user_id`, sum(`d`.`revenue`) AS `sum_1`
FROM (SELECT DISTINCT `e`.`user_id` AS `user_id`, `e`.`id` AS `id`, `e`.`revenue` AS `revenue`
FROM `prod`.`order_completed` AS `e`
WHERE `e`.`user_id` IS NOT NULL AND `e`.`timestamp` >= :as_of_minus_90_days AND `e`.`timestamp` < :as_of AND `e`.`revenue` >= 100) AS `d` GROUP BY `d`.`user_id`),
`audience_2` AS
(SELECT DISTINCT `q`.`user_id` AS `user_id`
FROM (SELECT user_id FROM prod.churn_scores WHERE score > 0.8) AS `q`
WHERE `q`.`user_id` IS NOT NULL)
 SELECT `u`.`id` AS `user_id`, `u`.`email` AS `email`
FROM `prod`.`users` AS `u` JOIN `events_1` ON `events_1`.`user_id` = `u`.`id` LEFT OUTER JOIN `audience_2` ON `audience_2`.`user_id` = `u`.`id`
WHERE `events_1`.`sum_1` > 500 AND `u`.`plan` = 'enterprise' AND `audience_2`.`user_id` IS NULL
